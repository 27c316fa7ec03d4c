"""SwAV-specific checks: Sinkhorn-Knopp against its marginals, the multi-crop forward (one backbone pass per
resolution), the queue (a rank's share, its rows after a run and in the checkpoint), the prototypes (unit length,
frozen at first), the collapse warning and the settings that must fit together. The battery (tests/case_swav.py)
checks the loss and the codes against the formula and across ranks.

Its case in the battery (CASE, which tests/test_battery.py runs): swav_loss with and without a queue against the
paper's formula computed one image at a time (Sinkhorn-Knopp written out over the whole matrix, as the official
distributed_sinkhorn on one rank), and the buffers that must not depend on how the batch is split over ranks: the
codes of every image and the queue after an enqueue. A rank scores its own share of the queue, as train() does."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import swav
from battery import MethodCase
from common.config import UsageError


# ---- the battery's case ----
TEMPERATURE, EPS, ITERATIONS = 0.5, 0.3, 3
CROPS, PROTOTYPES = 4, 12  # 2 global and 2 local crops


def swav_inputs():
    """Batch first, as the battery splits it: scores n x crops x K, and the global crops' embeddings z."""
    g = torch.Generator().manual_seed(0)
    return {"scores": torch.randn(8, CROPS, PROTOTYPES, generator=g), "z": torch.randn(8, 2, 16, generator=g)}


def start_queue():
    """The scores of a queue of 16 past embeddings per global crop (2 x 16 x K), and the queue itself."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, PROTOTYPES, generator=g), torch.randn(2, 16, 16, generator=g)


def swav_call(module, x):
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(x["scores"])
    scores = x["scores"].transpose(0, 1).reshape(CROPS * n, PROTOTYPES)  # crop by crop, as SwAV.forward
    queue_scores, queue = start_queue()
    share = queue_scores.view(2, world_size, -1, PROTOTYPES)[:, rank]  # this rank's share, as SwAV.queue_scores
    loss, codes = module.swav_loss(scores, CROPS, TEMPERATURE, EPS, ITERATIONS)
    queued_loss, queued_codes = module.swav_loss(scores, CROPS, TEMPERATURE, EPS, ITERATIONS, share)
    for crop in range(2):  # step 1: the embeddings of all ranks fill rows 8..15
        module.enqueue(queue[crop], x["z"][:, crop], step=1)
    codes = module.gather_no_grad(torch.cat([codes, queued_codes]).transpose(0, 1))  # N x 4 x K: every image's
    return loss + queued_loss, {"codes": codes, "queue": queue}


def sinkhorn_reference(rows, eps=EPS, iterations=ITERATIONS):
    """The official algorithm on one matrix of B rows (lists of K floats): Q = exp(S / eps)^T normalised to sum 1,
    then each iteration rows of Q (prototypes) to 1/K and its columns (images) to 1/B; returns B x Q^T."""
    b, k = len(rows), len(rows[0])
    q = [[math.exp(rows[i][j] / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / columns[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def swav_reference(x):
    """Per image i, global crop a and other crop v: -sum_k q_a[i]_k log softmax(s_v[i] / T)_k; the mean over v, a
    and i; without the queue, then with it (the queue's rows join Sinkhorn's matrix, only the batch's codes kept)."""
    scores = x["scores"].double().tolist()  # n x crops x K
    n = len(scores)
    queue_scores = start_queue()[0].double().tolist()

    def log_softmax(row):
        top = max(v / TEMPERATURE for v in row)
        log_total = top + math.log(sum(math.exp(v / TEMPERATURE - top) for v in row))
        return [v / TEMPERATURE - log_total for v in row]

    def loss(queue):
        codes = [sinkhorn_reference(queue[a] + [scores[i][a] for i in range(n)])[len(queue[a]):] for a in range(2)]
        terms = [-sum(q * l for q, l in zip(codes[a][i], log_softmax(scores[i][v])))
                 for a in range(2) for v in range(CROPS) if v != a for i in range(n)]
        return sum(terms) / len(terms)

    return loss([[], []]) + loss(queue_scores)


CASE = MethodCase(model="SwAV", inputs=swav_inputs, call=swav_call, reference=swav_reference,
                  small=["--proj_hidden_dim", "64", "--proj_dim", "32", "--num_prototypes", "30", "--num_local", "2",
                         "--local_size", "8", "--queue_size", "32", "--queue_start_epoch", "0",
                         "--freeze_prototypes_epochs", "0.75"])


# ---- swav's own tests ----
def unit_scores(images=64, prototypes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(images, 16, generator=g), dim=1) @ F.normalize(
        torch.randn(prototypes, 16, generator=g), dim=1).T


def test_sinkhorn_codes_sum_to_one_and_share_the_prototypes_evenly():
    scores = unit_scores()
    errors = {}
    for iterations in (1, 3, 300):
        codes = swav.sinkhorn(scores, eps=0.05, iterations=iterations)
        assert codes.shape == (64, 10) and (codes >= 0).all()
        torch.testing.assert_close(codes.sum(1), torch.ones(64))  # each image's code sums to 1
        errors[iterations] = (codes.sum(0) / 64 - 1 / 10).abs().max().item()  # each prototype's share vs 1/K
    assert errors[300] < 1e-5 < errors[3] < errors[1]  # three iterations only approach the equal partition
    assert not swav.sinkhorn(scores.double(), 0.05, 3).requires_grad  # no grad; fp32 whatever comes in
    assert swav.sinkhorn(scores.bfloat16(), 0.05, 3).dtype == torch.float32


def test_multi_crop_forward_runs_each_resolution_once():
    seen = []

    def net(x):
        seen.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    crops = [torch.full((2, 3, size, size), float(i)) for i, size in enumerate((32, 32, 16, 16, 16))]
    out = swav.multi_crop_forward(net, crops)
    assert seen == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # crop by crop, in order


def tiny(**overrides):
    settings = dict(image_size=16, local_size=8, num_local=2, batch_size=4, proj_hidden_dim=16, proj_dim=8,
                    num_prototypes=6, queue_size=8)
    return swav.Config(**{**settings, **overrides})


def test_forward_scores_unit_vectors_against_unit_prototypes():
    torch.manual_seed(0)
    model = swav.SwAV(tiny())
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    model.normalize_prototypes()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(6))
    crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
    with torch.autocast("cpu", torch.bfloat16):  # mixed precision: the scores still in fp32 (Sinkhorn's eps)
        z, scores = model(crops)
    assert z.shape == (16, 8) and scores.shape == (16, 6) and scores.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(16))
    assert scores.abs().max() <= 1 + 1e-5  # cosines


def test_queue_scores_are_this_ranks_share():
    model = swav.SwAV(tiny())
    model.queue.copy_(torch.randn(2, 8, 8))
    whole = model.queue_scores(0, 1)
    halves = [model.queue_scores(rank, 2) for rank in range(2)]
    assert whole.shape == (2, 8, 6) and halves[0].shape == (2, 4, 6)
    torch.testing.assert_close(torch.cat(halves, dim=1), whole)


def test_the_trained_run_froze_the_prototypes_then_filled_the_queue(trained):
    """The battery's run (its case, above: prototypes frozen for 0.75 epoch = 3 steps, a queue of 32 rows = 2
    global batches from step 0): after step 3 the optimizer holds no state for the prototypes (they never had a
    gradient) and they are the unit vectors of step 3's start, after step 4 it does and they have moved; the queue
    is full of unit vectors from step 2 on, and the checkpoint keeps it."""
    cfg = swav.Config(proj_hidden_dim=64, proj_dim=32, num_prototypes=30)
    model = swav.SwAV(cfg)
    params = [p for group in swav.build_optimizer(cfg, model).param_groups for p in group["params"]]
    index = next(i for i, p in enumerate(params) if p is model.prototypes.weight)
    at_3 = torch.load(trained["swav"] / "step_00000003.pt", weights_only=True)
    at_4 = torch.load(trained["swav"] / "step_00000004.pt", weights_only=True)
    assert index not in at_3["optimizer"]["state"] and index in at_4["optimizer"]["state"]
    for ckpt in (at_3, at_4):
        torch.testing.assert_close(ckpt["model"]["queue"].norm(dim=2), torch.ones(2, 32))
    # normalised before each step's forward: still unit vectors after a frozen step, not after a trained one
    torch.testing.assert_close(at_3["model"]["prototypes.weight"].norm(dim=1), torch.ones(30))
    assert (at_4["model"]["prototypes.weight"].norm(dim=1) - 1).abs().max() > 1e-4


def test_collapse_warning():
    ln_k = math.log(3000)
    healthy = {"train/epoch_loss": 5.0, "train/epoch_code_entropy": 3.0, "train/epoch_prototypes_used": 0.8}
    assert swav.collapse_warning(healthy, 3000) is None
    assert swav.collapse_warning({**healthy, "train/epoch_loss": 7.925, "train/epoch_code_entropy": 7.76}, 3000) \
        is None  # the slow start of a healthy run (epoch 9 of the real-image check in README)
    for name, value in (("loss", ln_k * 1.001), ("code_entropy", ln_k * 0.998), ("prototypes_used", 0.004)):
        message = swav.collapse_warning({**healthy, f"train/epoch_{name}": value}, 3000)
        assert message.startswith("warning: SwAV looks collapsed") and "--sinkhorn_eps" in message


def test_settings_that_must_fit_together(capsys):
    assert swav.check_swav(tiny(queue_size=3840, batch_size=100), world_size=2, is_main=True) == 3800
    assert "queue_size 3840 trimmed to 3800" in capsys.readouterr().out
    assert swav.check_swav(tiny(queue_size=0), world_size=2, is_main=True) == 0
    for overrides, message in ((dict(queue_size=50, batch_size=64), "holds no whole global batch"),
                               (dict(local_min_scale=0.5, crop_min_scale=0.14), "crop scales must satisfy"),
                               (dict(sinkhorn_eps=0.0), "sinkhorn_eps > 0")):
        with pytest.raises(UsageError, match=message):
            swav.check_swav(tiny(**overrides), world_size=1, is_main=True)


def test_codes_under_bf16_stay_near_the_fp32_codes():
    """The scores and Sinkhorn run in fp32 under autocast, so only the trunk's features carry bf16's rounding,
    which Sinkhorn's 1/eps amplifies: at initialisation (ResNet-18 at 16 px, 64 images) the codes are about 6 %
    (L1) from the fp32 codes; 10 % is the bound."""
    torch.manual_seed(0)
    cfg = swav.Config(num_local=0, queue_size=0, image_size=16)
    model = swav.SwAV(cfg).train()
    crops = [torch.randn(64, 3, 16, 16), torch.randn(64, 3, 16, 16)]
    codes = {}
    for bf16 in (False, True):
        replica = copy.deepcopy(model)  # the same BN state for each forward
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            _, scores = replica(crops)
        assert scores.dtype == torch.float32
        codes[bf16] = swav.sinkhorn(scores[:64], cfg.sinkhorn_eps, cfg.sinkhorn_iterations)
    assert float((codes[True] - codes[False]).abs().sum() / codes[False].abs().sum()) < 0.10
