"""ReLIC-specific checks: alpha 0 is the InfoNCE alone; the KL term is >= 0 and 0 when the two orders' rows
coincide; where the gradient flows with h = f and with the target network; the target follows the EMA."""
import pytest
import torch

import relic


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
