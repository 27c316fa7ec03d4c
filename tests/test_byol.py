"""BYOL-specific checks: the EMA target update and its rate schedule, the stop-gradient on the target network,
and the loss at its endpoints (what the battery's formula and resume tests do not pin down).

Its case in the battery (CASE, which tests/test_battery.py runs): the symmetric regression loss against its
per-sample formula.

The target projections are plain inputs here: the stop-gradient is where the paper puts it, on the target
network (BYOL.forward runs it under torch.no_grad(); a test below checks that), not in the loss."""
import math

import pytest
import torch
import torch.nn as nn

import byol
from battery import MethodCase


# ---- the battery's case ----
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


# ---- byol's own tests ----
def small_model():
    cfg = byol.Config(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    torch.manual_seed(0)
    return byol.BYOL(cfg)


# ---- the EMA update: xi <- m * xi + (1 - m) * theta, parameters only ----
def dyadic_net(seed):
    """Linear-BN whose parameters and buffers are small multiples of 1/8, so that m = 0.75 gives an
    exactly representable convex combination (no rounding to blur an off-by-one-term update)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for t in list(net.parameters()) + [net[1].running_mean, net[1].running_var]:
            t.copy_(torch.randint(-16, 17, t.shape, generator=g) / 8)
    return net


@pytest.mark.parametrize("m", [1.0, 0.0, 0.75])
def test_ema_update_is_the_convex_combination(m):
    online, target = dyadic_net(0), dyadic_net(1).requires_grad_(False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    byol.ema_update(target, online, m)
    for name, theta in online.named_parameters():
        expected = m * before[name] + (1 - m) * theta.detach()
        assert torch.equal(target.get_parameter(name), expected), name
    if m == 1.0:
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    if m == 0.0:
        assert all(torch.equal(p, q) for p, q in zip(target.parameters(), online.parameters()))
    # buffers are the target's own: the EMA never touches them
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(target.state_dict()[name], before[name])


def test_update_target_covers_the_whole_target_network():
    model = small_model()
    with torch.no_grad():
        for p in list(model.backbone.parameters()) + list(model.projector.parameters()):
            p.add_(1.0)  # online and target now differ everywhere
    model.update_target(0.0)
    for online, target in ((model.backbone, model.target_backbone), (model.projector, model.target_projector)):
        for (name, theta), (name_t, xi) in zip(online.named_parameters(), target.named_parameters(), strict=True):
            assert name == name_t and torch.equal(theta, xi), name


def test_ema_rate_schedule():
    total, base = 1000, 0.99
    assert byol.ema_at(0, total, base) == pytest.approx(base, abs=1e-15)
    assert byol.ema_at(total, total, base) == 1.0
    assert byol.ema_at(total // 2, total, base) == pytest.approx((1 + base) / 2)
    values = [byol.ema_at(s, total, base) for s in range(total + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert byol.ema_at(1, total, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi / total) + 1) / 2)


# ---- the stop-gradient, where the paper puts it: the target network ----
def test_target_gets_no_gradient():
    model = small_model()
    for online, target in ((model.backbone, model.target_backbone), (model.projector, model.target_projector)):
        assert all(torch.equal(p, q) for p, q in zip(online.parameters(), target.parameters()))  # a copy
    assert all(not p.requires_grad for p in model.target_backbone.parameters())
    assert all(not p.requires_grad for p in model.target_projector.parameters())
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    p1, p2, target_z1, target_z2 = model(x1, x2)
    # the paper's sg, once: the target network runs without a graph
    assert not target_z1.requires_grad and not target_z2.requires_grad and p1.requires_grad
    byol.byol_loss(p1, p2, target_z1, target_z2).backward()
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert p.grad is None, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    # the optimizer holds the online network only
    optimizer = byol.build_optimizer(byol.Config(), model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for name, p in model.named_parameters() if not name.startswith("target_")}


# ---- the loss at its endpoints: 0 for aligned, 2 x (2 - 2 * (-1)) = 8 for opposite directions ----
def test_loss_endpoints_and_pairing():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert byol.byol_loss(a, b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # p1 ~ z2, p2 ~ z1
    assert byol.byol_loss(3 * a, 0.5 * b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert byol.byol_loss(a, b, -b, -a).item() == pytest.approx(8.0, abs=1e-6)
    # the views are crossed: predicting the target of the SAME view is not what is rewarded
    assert byol.byol_loss(a, b, a, b).item() > 1.0


def test_loss_scale_multiplies_the_training_loss(tmp_path, monkeypatch):
    """--loss_scale 0.5 (configs/byol.yaml: solo-learn's mean of the two directions): the same first step's loss,
    halved."""
    from battery import quick_args
    from common.config import load_config
    from common.step_metrics import StepMetrics
    losses, add = [], StepMetrics.add

    def record(self, loss, **values):
        losses.append(loss.detach().item())
        return add(self, loss=loss, **values)
    monkeypatch.setattr(StepMetrics, "add", record)
    first = {}
    for scale in ("1", "0.5"):
        losses.clear()
        byol.train(load_config(byol.Config, quick_args("byol", tmp_path / scale, "--loss_scale", scale, epochs=1)[1:]))
        first[scale] = losses[0]
    assert first["0.5"] == pytest.approx(first["1"] / 2, rel=1e-5)
