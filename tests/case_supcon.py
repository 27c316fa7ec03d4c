"""SupCon's entry in the battery: L_out against its per-anchor formula, over labels that repeat and labels that
occur once (whose only positive is the image's other view), with the labels gathered across ranks."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase

LABELS = [0, 1, 0, 2, 1, 1, 3, 0]  # 2 and 3 occur once; each rank's half holds a label found on the other rank
TEMPERATURE = 0.3


def supcon_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z": torch.randn(8, 2, 16, generator=g), "labels": torch.tensor(LABELS)}  # n x views x d, n


def supcon_call(module, x):
    return module.supcon_loss(x["z"], x["labels"], temperature=TEMPERATURE), {}


def supcon_reference(x):
    """Eq. 2 of the paper, literally: over the views i of all images, with A(i) every other view and P(i) those of
    i's class, -1/|P(i)| sum_p log exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau), averaged over the anchors
    (an anchor without positives counts 0, as in the official code)."""
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
