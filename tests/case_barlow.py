"""Barlow Twins' entry in the battery: the loss against its per-element formula."""
import math

import torch

from battery import MethodCase

LAMBD = 0.25  # not the recipe's value: both terms must visibly count


def barlow_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z1": torch.randn(8, 6, generator=g) * 2 + 1, "z2": torch.randn(8, 6, generator=g) - 3}


def barlow_call(module, x):
    return module.barlow_loss(x["z1"], x["z2"], lambd=LAMBD), {}


def barlow_reference(x):
    """Literally: zhat[b, i] = (z[b, i] - mean_b z[b, i]) / sqrt(var_b z[b, i] + 1e-5) with the biased variance
    (BatchNorm's), C_ij = (1/N) sum_b zhat_A[b, i] zhat_B[b, j],
    L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2."""
    za, zb = x["z1"].double().tolist(), x["z2"].double().tolist()
    N, D = len(za), len(za[0])

    def normalized(z):
        out = [[0.0] * D for _ in range(N)]
        for i in range(D):
            mean = sum(z[b][i] for b in range(N)) / N
            var = sum((z[b][i] - mean) ** 2 for b in range(N)) / N
            for b in range(N):
                out[b][i] = (z[b][i] - mean) / math.sqrt(var + 1e-5)
        return out

    ha, hb = normalized(za), normalized(zb)
    loss = 0.0
    for i in range(D):
        for j in range(D):
            c_ij = sum(ha[b][i] * hb[b][j] for b in range(N)) / N
            loss += (1 - c_ij) ** 2 if i == j else LAMBD * c_ij ** 2
    return loss


CASE = MethodCase(model="BarlowTwins", inputs=barlow_inputs, call=barlow_call, reference=barlow_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])
