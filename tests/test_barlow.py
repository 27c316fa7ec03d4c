"""Barlow Twins' own tests: the loss's normalisation, its two terms, and its global statistics across ranks.

Its case in the battery (CASE, which tests/test_battery.py runs): the loss against its per-element formula."""
import math

import pytest
import torch
import torch.nn.functional as F

import barlow
from battery import MethodCase, quick_args, run_ranks
from helpers import assert_ok, run_script


# ---- the battery's case ----
LAMBD = 0.25  # not the recipe's value: both terms must visibly count


def barlow_inputs():
    g = torch.Generator().manual_seed(0)
    return {"z1": torch.randn(8, 6, generator=g) * 2 + 1, "z2": torch.randn(8, 6, generator=g) - 3}


def barlow_call(module, x):
    return module.barlow_loss(x["z1"], x["z2"], lambd=LAMBD), {}


def barlow_reference(x):
    """Literally: zhat[b, i] = (z[b, i] - mean_b z[b, i]) / sqrt(var_b z[b, i] + 1e-5) with the biased variance
    (BatchNorm's), C_ij = (1/N) sum_b zhat_A[b, i] zhat_B[b, j],
    L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2."""
    za, zb = x["z1"].double().tolist(), x["z2"].double().tolist()
    N, D = len(za), len(za[0])

    def normalized(z):
        out = [[0.0] * D for _ in range(N)]
        for i in range(D):
            mean = sum(z[b][i] for b in range(N)) / N
            var = sum((z[b][i] - mean) ** 2 for b in range(N)) / N
            for b in range(N):
                out[b][i] = (z[b][i] - mean) / math.sqrt(var + 1e-5)
        return out

    ha, hb = normalized(za), normalized(zb)
    loss = 0.0
    for i in range(D):
        for j in range(D):
            c_ij = sum(ha[b][i] * hb[b][j] for b in range(N)) / N
            loss += (1 - c_ij) ** 2 if i == j else LAMBD * c_ij ** 2
    return loss


CASE = MethodCase(model="BarlowTwins", inputs=barlow_inputs, call=barlow_call, reference=barlow_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32"])


# ---- barlow's own tests ----
def hadamard(n):
    """Sylvester's n x n Hadamard matrix (n a power of 2): +-1 entries, orthogonal columns."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def correlation(z1, z2):
    """C computed independently of barlow.py: torch's own batch norm in training mode (biased, eps 1e-5)."""
    h1 = F.batch_norm(z1, None, None, training=True, eps=1e-5)
    h2 = F.batch_norm(z2, None, None, training=True, eps=1e-5)
    return h1.T @ h2 / len(z1)


def test_zero_for_identical_decorrelated_views_and_exact_for_a_permutation():
    # columns 1..4 of a Hadamard matrix: zero mean, unit (biased) variance, uncorrelated
    z = hadamard(8)[:, 1:5]
    same = barlow.barlow_loss(z, 3 * z + 2, lambd=1.0)  # zhat_A = zhat_B up to eps
    assert same.item() == pytest.approx(0.0, abs=1e-8)
    # view B's dimensions in another order (a derangement): C is a permutation matrix, so every diagonal
    # term is (1 - 0)^2 and D off-diagonal entries are 1
    swapped = barlow.barlow_loss(z, z[:, [1, 2, 3, 0]], lambd=0.3)
    assert swapped.item() == pytest.approx(4 + 0.3 * 4, rel=1e-4)


def test_invariant_to_per_dimension_scale_and_shift():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g) + 0.5 * torch.randn(32, 5, generator=g)
    a1, a2 = torch.rand(5, generator=g) * 3 + 0.5, torch.rand(5, generator=g) * 3 + 0.5  # positive scales
    b1, b2 = torch.randn(5, generator=g) * 10, torch.randn(5, generator=g) * 10
    loss = barlow.barlow_loss(z1, z2, lambd=0.5)
    moved = barlow.barlow_loss(a1 * z1 + b1, a2 * z2 + b2, lambd=0.5)
    assert moved.item() == pytest.approx(loss.item(), rel=1e-4)


def test_normalisation_is_batchnorm_without_affine():
    z = torch.randn(16, 7, dtype=torch.float64) * 3 + 1
    expected = F.batch_norm(z, None, None, training=True, eps=1e-5)  # biased variance, eps inside the sqrt
    torch.testing.assert_close(barlow.batch_normalize(z, len(z)), expected)


def test_lambda_weights_exactly_the_off_diagonal_part():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(24, 6, generator=g)
    z2 = z1 + 0.7 * torch.randn(24, 6, generator=g)
    c = correlation(z1, z2)
    on_diag = ((1 - c.diagonal()) ** 2).sum()
    off_diag = (c ** 2).sum() - (c.diagonal() ** 2).sum()
    assert off_diag > 0.1 and on_diag > 0.1  # both terms matter for these inputs
    for lambd in (0.0, 0.0051, 1.0, 7.0):
        loss = barlow.barlow_loss(z1, z2, lambd=lambd)
        assert loss.item() == pytest.approx((on_diag + lambd * off_diag).item(), rel=1e-5)


# ---- two ranks whose halves differ in mean and spread: the statistics must be the GLOBAL batch's ----
def uneven_batch():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    z2 = 0.6 * z1 + 0.8 * z2  # correlated views, as after some training
    shift = torch.cat([torch.full((8, 5), 2.0), torch.full((8, 5), -1.5)]) * torch.arange(1.0, 6.0)  # per rank
    spread = torch.cat([torch.full((8, 1), 0.5), torch.full((8, 1), 3.0)])
    return z1 * spread + shift, z2 * spread - shift


def _rank_share(rank, world_size):
    z1, z2 = (z.chunk(world_size)[rank].clone().requires_grad_() for z in uneven_batch())
    loss = barlow.barlow_loss(z1, z2, lambd=0.5)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def test_two_ranks_with_uneven_halves_use_the_global_mean_and_variance():
    z1, z2 = (z.clone().requires_grad_() for z in uneven_batch())
    loss = barlow.barlow_loss(z1, z2, lambd=0.5)
    loss.backward()
    # the data must tell: normalising each half with its own statistics (and averaging C, as solo-learn's
    # loss does) gives a clearly different value
    halves = [correlation(a, b) for a, b in zip(z1.detach().chunk(2), z2.detach().chunk(2))]
    c = sum(halves) / 2
    per_rank = (((1 - c.diagonal()) ** 2).sum() + 0.5 * ((c ** 2).sum() - (c.diagonal() ** 2).sum())).item()
    assert abs(per_rank - loss.item()) > 0.1 * loss.item()

    ranks = run_ranks(_rank_share, 2)
    for rank_loss, _, _ in ranks:  # every rank computes the loss of the whole batch
        assert rank_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    # DDP averages over the 2 ranks: each rank's input gradients / 2 = the whole batch's
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / 2, z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, z2.grad, rtol=1e-4, atol=1e-6)


# ---- the optimizer's second group ----
def test_bias_lr_ratio_scales_the_lr_of_biases_and_norm_parameters(tmp_path):
    """With bias_lr_ratio 0, a run leaves every 1-d parameter (here: BN weights and biases) at its init,
    while the weights move."""
    assert_ok(run_script(quick_args("barlow", tmp_path / "run", "--warmup_epochs", "0", "--bias_lr_ratio", "0",
                                    epochs=1)))
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    cfg = barlow.Config(dataset="synthetic", proj_hidden_dim=64, proj_dim=32)
    torch.manual_seed(cfg.seed)
    fresh = dict(barlow.BarlowTwins(cfg).named_parameters())
    ones_d = [name for name, p in fresh.items() if p.ndim == 1]
    assert ones_d and all(torch.equal(trained[name], fresh[name].detach()) for name in ones_d)
    moved = [name for name, p in fresh.items() if p.ndim > 1 and not torch.equal(trained[name], p.detach())]
    assert len(moved) == len(fresh) - len(ones_d)


# ---- the cross-rank sums: C's gradient needs no communication; nothing is reduced in autograd's buffer ----
class _Ctx:
    def __init__(self, same_on_every_rank):
        self.same_on_every_rank = same_on_every_rank


def _backward_traffic(rank, world_size):
    """The sizes of the tensors all-reduced during the backward of barlow_loss, and whether SumOverRanks's
    backward leaves the gradient it is given as it was."""
    g = torch.Generator().manual_seed(4)
    z1, z2 = (torch.randn(16, 5, generator=g).chunk(world_size)[rank].clone().requires_grad_() for _ in range(2))
    loss = barlow.barlow_loss(z1, z2, lambd=0.5)
    sizes, all_reduce = [], torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda t, *a, **k: (sizes.append(t.numel()), all_reduce(t, *a, **k))[1]
    try:
        loss.backward()
    finally:
        torch.distributed.all_reduce = all_reduce
    untouched = []
    for same in (False, True):
        grad = torch.full((5,), float(rank + 1))
        barlow.SumOverRanks.backward(_Ctx(same), grad)
        untouched.append(torch.equal(grad, torch.full((5,), float(rank + 1))))
    return sizes, untouched


def test_backward_sends_no_cross_correlation_gradient_and_copies_before_reducing():
    for sizes, untouched in run_ranks(_backward_traffic, 2):
        assert sizes and 5 * 5 not in sizes and set(sizes) == {5}  # only the d-sized statistics' gradients
        assert untouched == [True, True]
