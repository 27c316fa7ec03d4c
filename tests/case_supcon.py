"""SupCon's entry in the battery: L_out against its per-anchor formula, with repeated labels, labels that occur
once (their only positive is the image's other view) and an image whose class has no other image."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase

LABELS = [0, 1, 0, 2, 1, 1, 3, 0]  # 2 and 3 occur once
TEMPERATURE = 0.3


def supcon_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z": torch.randn(8, 2, 16, generator=g), "labels": torch.tensor(LABELS)}


def supcon_call(module, x):
    return module.supcon_loss(x["z"], x["labels"], temperature=TEMPERATURE), {}


def supcon_reference(x):
    """Eq. 2 of the paper, literally: over the 2N views i, with A(i) every other view and P(i) those of i's
    class, -1/|P(i)| sum_p log exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau), averaged over the anchors."""
    tau = TEMPERATURE
    views = [(x["z"][i, v].double(), x["labels"][i].item()) for v in range(x["z"].shape[1]) for i in range(len(x["z"]))]
    total = 0.0
    for i, (zi, yi) in enumerate(views):
        sims = [F.cosine_similarity(zi, za, dim=0).item() / tau for za, _ in views]
        denominator = sum(math.exp(s) for a, s in enumerate(sims) if a != i)
        positives = [p for p, (_, yp) in enumerate(views) if p != i and yp == yi]
        total += -sum(math.log(math.exp(sims[p]) / denominator) for p in positives) / max(len(positives), 1)
    return total / len(views)


CASE = MethodCase(model="SupCon", inputs=supcon_inputs, call=supcon_call, reference=supcon_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])
