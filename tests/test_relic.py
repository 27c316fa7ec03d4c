"""ReLIC-specific checks: alpha 0 is the InfoNCE alone; the KL term is >= 0 and 0 when the two orders' rows
coincide; where the gradient flows with h = f and with the target network; the target follows the EMA.

Its case in the battery (CASE, which tests/test_battery.py runs): InfoNCE plus alpha x the KL between the
similarity distributions that the two augmentation orders induce for each image, against the paper's Eq. 3 computed
one image at a time."""
import math

import pytest
import torch
import torch.nn.functional as F

import relic
from battery import MethodCase


# ---- the battery's case ----
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


# ---- relic's own tests ----
def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 8, generator=g).requires_grad_() for _ in range(4)]


def test_alpha_zero_is_the_infonce_alone_and_kl_is_nonnegative():
    u1, u2, v1, v2 = inputs()
    loss, nce, kl = relic.relic_loss(u1, u2, v1, v2, 0.2, alpha=0.0)
    assert loss.item() == nce.item() and kl.item() >= 0
    loss_1, nce_1, kl_1 = relic.relic_loss(u1, u2, v1, v2, 0.2, alpha=1.5)
    assert nce_1.item() == pytest.approx(nce.item()) and loss_1.item() == pytest.approx(nce.item() + 1.5 * kl.item())


def test_kl_is_zero_when_both_orders_give_the_same_distribution():
    """Views that the critic maps alike (u1 = u2, v1 = v2) give the same rows in both orders: no penalty."""
    a, _, b, _ = inputs(1)
    _, _, kl = relic.relic_loss(a, a, b, b, 0.2, alpha=1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    u1, u2, v1, v2 = inputs(3)
    assert relic.relic_loss(u1, u2, v1, v2, 0.2, alpha=1.0)[2].item() > 1e-3


def test_gradient_flows_through_both_sides_without_a_target():
    """h = f: the KL and the InfoNCE train both the anchors' and the candidates' side (no stop-gradient, Eq. 3)."""
    u1, u2, _, _ = inputs(2)
    _, _, kl = relic.relic_loss(u1, u2, u1, u2, 0.2, alpha=1.0)
    kl.backward()
    assert u1.grad.abs().sum() > 0 and u2.grad.abs().sum() > 0


def test_target_network_gets_no_gradient_and_follows_the_ema():
    cfg = relic.Config(target_ema=True, proj_hidden_dim=16, proj_dim=8)
    torch.manual_seed(0)
    model = relic.ReLIC(cfg).train()
    x = torch.randn(4, 3, 32, 32)
    u1, u2, v1, v2 = model(x, x.flip(3))
    assert not v1.requires_grad and u1.requires_grad
    relic.relic_loss(u1, u2, v1, v2, 0.2, 1.0)[0].backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    before = [p.clone() for p in model.target_projector.parameters()]
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)
    model.update_target(0.9)
    for old, new, online in zip(before, model.target_projector.parameters(), model.projector.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online.detach())
    plain = relic.ReLIC(relic.Config(proj_hidden_dim=16, proj_dim=8))
    assert plain.target_backbone is None and not any(k.startswith("target_") for k in plain.state_dict())
