"""ReLIC's entry in the battery: InfoNCE plus alpha x the KL between the similarity distributions that the two
augmentation orders induce for each image, against the paper's Eq. 3 computed one image at a time."""
import math

import torch
import torch.nn.functional as F

from battery import MethodCase

TEMPERATURE, ALPHA = 0.3, 0.7


def relic_inputs():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(8, 16, generator=g) for name in ("u1", "u2", "v1", "v2")}


def relic_call(module, x):
    loss, _, _ = module.relic_loss(x["u1"], x["u2"], x["v1"], x["v2"], TEMPERATURE, ALPHA)
    return loss, {}


def relic_reference(x):
    """For each image i and order (a, b) in ((1, 2), (2, 1)): p_ab(j) = exp(cos(u_a[i], v_b[j]) / tau) / sum_m
    exp(cos(u_a[i], v_b[m]) / tau); the term -log p_ab(i) + alpha sum_j p_ab(j) log(p_ab(j) / p_ba(j)); the
    mean over orders and images."""
    rows = {name: x[name].double() for name in x}
    n = len(x["u1"])

    def distribution(u, v):
        weights = [math.exp(F.cosine_similarity(u, v[j], dim=0).item() / TEMPERATURE) for j in range(n)]
        return [w / sum(weights) for w in weights]

    total = 0.0
    for i in range(n):
        p12 = distribution(rows["u1"][i], rows["v2"])
        p21 = distribution(rows["u2"][i], rows["v1"])
        for p, q in ((p12, p21), (p21, p12)):
            total += -math.log(p[i]) + ALPHA * sum(p[j] * math.log(p[j] / q[j]) for j in range(n))
    return total / (2 * n)


CASE = MethodCase(model="ReLIC", inputs=relic_inputs, call=relic_call, reference=relic_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])
