"""BYOL's entry in the battery: the symmetric regression loss against its per-sample formula.

The loss's four inputs travel as ONE tensor, n x 4 x d (p1, p2, z1, z2 along dim 1): byol_loss detaches the
target projections z1, z2, so as separate inputs they would have no .grad for the battery's gradient check;
as slices of one input their gradient is zero, and the check also asserts that (no gradient reaches them)."""
import torch

from battery import MethodCase


def byol_inputs():
    g = torch.Generator().manual_seed(0)
    return {"p1_p2_z1_z2": torch.randn(8, 4, 16, generator=g)}


def byol_call(module, x):
    p1, p2, z1, z2 = x["p1_p2_z1_z2"].unbind(1)
    return module.byol_loss(p1, p2, z1, z2), {}


def byol_reference(x):
    """Eq. 2 of the paper, literally, for each image i: the online prediction of one view against the target
    projection of the other, 2 - 2 <p, z> / (||p|| ||z||), both directions, averaged over the images."""
    def regression(p, z):
        dot = sum(p[k] * z[k] for k in range(len(p)))
        return 2 - 2 * dot / (sum(v * v for v in p) ** 0.5 * sum(v * v for v in z) ** 0.5)

    rows = x["p1_p2_z1_z2"].double().tolist()
    return sum(regression(p1, z2) + regression(p2, z1) for p1, p2, z1, z2 in rows) / len(rows)


CASE = MethodCase(byol_inputs, byol_call, byol_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "64"])
