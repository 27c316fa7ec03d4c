"""SimCLR's own tests, beyond the battery: the autograd-aware gather and the projector options.

Its case in the battery (CASE, which tests/test_battery.py runs): NT-Xent against its per-anchor formula."""
import math

import torch
import torch.nn.functional as F

import simclr
from battery import MethodCase, run_ranks
from helpers import REPO


# ---- the battery's case ----
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


# ---- simclr's own tests ----
def _backward_leaves_its_input(rank, world_size):
    grad = torch.arange(8.0).reshape(4, 2) * (rank + 1)  # 2 ranks x 2 rows: this rank's gradient of the gather
    before = grad.clone()
    mine = simclr.GatherWithGrad.backward(None, grad)
    return torch.equal(grad, before), mine


def test_gather_backward_sums_over_ranks_without_touching_autograds_buffer():
    """all_reduce works in place; the backward must reduce a copy, never the gradient autograd handed it."""
    results = run_ranks(_backward_leaves_its_input, 2)
    total = torch.arange(8.0).reshape(4, 2) * 3  # (1 + 2) x the pattern
    for rank, (untouched, mine) in enumerate(results):
        assert untouched
        torch.testing.assert_close(mine, total[2 * rank:2 * rank + 2])


def test_official_projector_option():
    """proj_bias false, proj_last_bn true: Linear-BN-ReLU-Linear-BN without biases, the output BN scaling
    but never shifting (the official code's center=False), so its offset is not trained."""
    cfg = simclr.Config(proj_hidden_dim=16, proj_dim=8, proj_bias=False, proj_last_bn=True)
    model = simclr.SimCLR(cfg)
    projector = model.projector
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert projector[0].bias is None and projector[3].bias is None
    held = {id(p) for group in simclr.build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert id(projector[4].weight) in held and id(projector[4].bias) not in held
    assert not projector[4].bias.requires_grad and bool((projector[4].bias == 0).all())


def test_solo_learns_cifar_head_has_no_hidden_bn():
    """proj_hidden_bn false (configs/simclr.yaml, the run behind solo-learn's 90.74 %): Linear-ReLU-Linear."""
    from common.config import load_config
    cfg = load_config(simclr.Config, ["--config", str(REPO / "configs" / "simclr.yaml"), "--proj_hidden_dim", "16",
                                      "--proj_dim", "8"])
    assert [type(m).__name__ for m in simclr.SimCLR(cfg).projector] == ["Linear", "ReLU", "Linear"]


def test_simclr_v2_config_builds_the_deeper_head():
    """configs/simclr_v2.yaml: SimCLR v2's 3-layer projector, BN on every layer, no biases, the output BN scaling
    but never shifting; mlp without hidden BN (hidden_bn=False) for the heads that have none."""
    from common.config import load_config
    from helpers import REPO
    cfg = load_config(simclr.Config, ["--config", str(REPO / "configs" / "simclr_v2.yaml")])
    cfg.arch = "resnet18"  # the head's shape, without building a ResNet-50
    projector = simclr.SimCLR(cfg).projector
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [m.out_features for m in projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 128]
    assert all(m.bias is None for m in projector if isinstance(m, torch.nn.Linear))
    assert not projector[-1].bias.requires_grad
    plain = simclr.mlp(8, 16, 4, layers=3, hidden_bn=False)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
