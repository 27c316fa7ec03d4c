"""SimCLR's entry in the battery: NT-Xent against its per-anchor formula."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase


def simclr_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z1": torch.randn(8, 16, generator=g), "z2": torch.randn(8, 16, generator=g)}


def simclr_call(module, x):
    return module.simclr_loss(x["z1"], x["z2"], temperature=0.3), {}


def simclr_reference(x):
    """NT-Xent, literally: for each of the 2N anchors i with positive j,
    -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged."""
    tau, n = 0.3, len(x["z1"])
    z = torch.cat([x["z1"], x["z2"]]).double()
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = [F.cosine_similarity(z[i], z[k], dim=0) for k in range(2 * n)]
        denominator = sum(math.exp(sim[k] / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim[j] / tau) / denominator)
    return total / (2 * n)


CASE = MethodCase(model="SimCLR", inputs=simclr_inputs, call=simclr_call, reference=simclr_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])
