"""SimSiam's own tests, beyond the battery: the stop-gradient, the predictor's fixed lr, the collapse monitor.

Its case in the battery (CASE, which tests/test_battery.py runs): the symmetric negative cosine against its per-
sample formula.

The inputs are the projections z1, z2; the predictions come from a fixed linear predictor, p = h(z) = z W, so
that z, like in the model, reaches the loss twice: as the (stopped) target and through the predictor. The
stop-gradient then shows in the gradient the battery compares (z's gradient flows only through h) rather
than leaving z without a gradient."""
import math

import pytest
import torch

import simsiam
from battery import MethodCase, quick_args
from helpers import read_jsonl, run_script


# ---- the battery's case ----
DIM = 16


def predictor_weight():
    noise = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(1))
    return torch.eye(DIM) + 0.3 * noise / DIM ** 0.5


def simsiam_inputs():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, DIM, generator=g)
    return {"z1": z1, "z2": z1 + 0.5 * torch.randn(8, DIM, generator=g)}  # two views: similar, not equal


def simsiam_call(module, x):
    w = predictor_weight()
    return module.simsiam_loss(x["z1"] @ w, x["z2"] @ w, x["z1"], x["z2"]), {}


def simsiam_reference(x):
    """L = 1/2 D(p1, z2) + 1/2 D(p2, z1), D(p, z) = -p.z / (||p|| ||z||), literally, per image, averaged."""
    w = predictor_weight().double()
    z1, z2 = x["z1"].double(), x["z2"].double()
    total = 0.0
    for i in range(len(z1)):
        p1 = [sum(z1[i, k] * w[k, j] for k in range(DIM)) for j in range(DIM)]  # h(z1_i)
        p2 = [sum(z2[i, k] * w[k, j] for k in range(DIM)) for j in range(DIM)]  # h(z2_i)
        total += 0.5 * negative_cosine(p1, z2[i]) + 0.5 * negative_cosine(p2, z1[i])
    return total / len(z1)


def negative_cosine(p, z):
    dot = sum(float(a) * float(b) for a, b in zip(p, z))
    norm_p = sum(float(a) ** 2 for a in p) ** 0.5
    norm_z = sum(float(b) ** 2 for b in z) ** 0.5
    return -dot / (norm_p * norm_z)


CASE = MethodCase(model="SimSiam", inputs=simsiam_inputs, call=simsiam_call, reference=simsiam_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--pred_hidden_dim", "16"])


# ---- simsiam's own tests ----
SMALL = dict(proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=16)


def test_stop_gradient_leaves_z_without_gradient():
    """The paper's stop-gradient: the loss trains p only; z is a constant target (no gradient at all)."""
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g).requires_grad_() for _ in range(4))
    simsiam.simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0


def test_stop_gradient_through_a_shared_encoder():
    """With p = h(z), z's gradient is exactly the one that flows through h, i.e. that of the loss whose
    targets are constants; without the stop-gradient it would also get D's gradient w.r.t. z."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g)
    z1, z2 = (torch.randn(8, 16, generator=g).requires_grad_() for _ in range(2))
    simsiam.simsiam_loss(z1 @ w, z2 @ w, z1, z2).backward()
    c1, c2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    cos = torch.nn.functional.cosine_similarity
    expected = -(cos(c1 @ w, z2.detach(), dim=1).mean() + cos(c2 @ w, z1.detach(), dim=1).mean()) / 2
    expected.backward()
    torch.testing.assert_close(z1.grad, c1.grad)
    torch.testing.assert_close(z2.grad, c2.grad)
    n1, n2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    no_stop = -(cos(n1 @ w, n2, dim=1).mean() + cos(n2 @ w, n1, dim=1).mean()) / 2
    no_stop.backward()
    assert not torch.allclose(n1.grad, z1.grad)  # the test can tell the two apart


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_predictor_lr_stays_fixed_while_the_rest_follows_the_cosine(optimizer):
    cfg = simsiam.Config(optimizer=optimizer, **SMALL)
    model = simsiam.SimSiam(cfg)
    opt = simsiam.build_optimizer(cfg, model, fixed_lr=model.predictor.parameters())
    fixed = {id(p) for group in opt.param_groups if group["fixed_lr"] for p in group["params"]}
    assert fixed == {id(p) for p in model.predictor.parameters()}  # exactly the predictor's parameters
    scheduled = {id(p) for group in opt.param_groups if not group["fixed_lr"] for p in group["params"]}
    assert scheduled == {id(p) for p in [*model.backbone.parameters(), *model.projector.parameters()]}
    total, warmup, peak = 100, 10, 0.8
    for step in (0, 5, 10, 50, 99, 100):
        lr = simsiam.lr_at(step, total, warmup, peak)
        simsiam.set_lr(opt, lr, peak_lr=peak)
        for group in opt.param_groups:
            assert group["lr"] == (peak if group["fixed_lr"] else pytest.approx(lr))
    assert simsiam.lr_at(99, total, warmup, peak) < 0.01 * peak  # the others did decay


def test_collapse_std():
    g = torch.Generator().manual_seed(0)
    d = 256
    healthy = simsiam.collapse_std(torch.randn(4096, d, generator=g))
    assert healthy.item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    collapsed = torch.randn(1, d, generator=g).expand(512, d) * 3.0
    assert simsiam.collapse_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # the scale of z does not matter (z is normalised); a nearly collapsed z is far below 1/sqrt(d)
    almost = torch.randn(1, d, generator=g) + 0.01 * torch.randn(512, d, generator=g)
    assert simsiam.collapse_std(almost).item() < 0.05 / math.sqrt(d)
    assert simsiam.collapse_std(7.0 * torch.randn(4096, d, generator=g)).item() == pytest.approx(
        1 / math.sqrt(d), rel=0.02)


def test_run_logs_z_std_warns_below_threshold_and_keeps_predictor_lr(tmp_path):
    """A run with the threshold above the healthy value (z_std can hardly exceed 1/sqrt(d)): the warning is
    on stderr; the checkpoint's predictor groups are at the peak lr, the others well down the cosine."""
    out = tmp_path / "run"
    result = run_script(quick_args("simsiam", out, "--collapse_warn", "2", "--warmup_epochs", "0", "--log_every", "2",
                                   epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "train/epoch_z_std" in warnings[0] and "collapsing" in warnings[0], result.stderr
    lines = read_jsonl(out / "metrics.jsonl")
    assert [line["step"] for line in lines if "train/z_std" in line] == [2, 4]  # every log_every steps
    [epoch] = [line for line in lines if "train/epoch_z_std" in line]
    assert 0.0 < epoch["train/epoch_z_std"] < 2 / math.sqrt(32)  # never much above 1/sqrt(proj_dim)
    # the default threshold, 0.1 x 1/sqrt(proj_dim), does not warn on these healthy outputs
    assert epoch["train/epoch_z_std"] > simsiam.Config.collapse_warn / math.sqrt(32)
    peak = lines[0]["peak_lr"]
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["fixed_lr"] for g in groups} == {True, False}
    for group in groups:  # the last step (3 of 4) set the others to peak x (1 + cos(3 pi / 4)) / 2 = 0.15 peak
        assert (group["lr"] == peak) if group["fixed_lr"] else (group["lr"] < 0.2 * peak)
