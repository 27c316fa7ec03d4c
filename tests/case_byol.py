"""BYOL's entry in the battery: the symmetric regression loss against its per-sample formula.

The target projections are plain inputs here: the stop-gradient is where the paper puts it, on the target
network (BYOL.forward runs it under torch.no_grad(); tests/test_byol.py checks that), not in the loss."""
import torch

from battery import MethodCase


def byol_inputs():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(8, 16, generator=g) for name in ("p1", "p2", "target_z1", "target_z2")}


def byol_call(module, x):
    return module.byol_loss(x["p1"], x["p2"], x["target_z1"], x["target_z2"]), {}


def byol_reference(x):
    """Eq. 2 of the paper, literally, for each image i: the online prediction of one view against the target
    projection of the other, 2 - 2 <p, z> / (||p|| ||z||), both directions, averaged over the images."""
    def regression(p, z):
        dot = sum(p[k] * z[k] for k in range(len(p)))
        return 2 - 2 * dot / (sum(v * v for v in p) ** 0.5 * sum(v * v for v in z) ** 0.5)

    rows = zip(*(x[name].double().tolist() for name in ("p1", "p2", "target_z1", "target_z2")))
    n = len(x["p1"])
    return sum(regression(p1, target_z2) + regression(p2, target_z1) for p1, p2, target_z1, target_z2 in rows) / n


CASE = MethodCase(model="BYOL", inputs=byol_inputs, call=byol_call, reference=byol_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "64"])
