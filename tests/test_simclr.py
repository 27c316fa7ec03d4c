"""SimCLR's own tests, beyond the battery: the autograd-aware gather and the projector options."""
import torch

import simclr
from battery import run_ranks


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
