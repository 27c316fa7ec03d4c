"""SwAV: "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments".
Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski, Armand Joulin. NeurIPS 2020.
arXiv:2006.09882.

Each image gives V crops: 2 global ones and V - 2 smaller local ones (multi-crop). Every crop's L2-normalised
projection z is scored against K prototypes c_k (unit vectors): s = z . C. Each global crop's scores are turned
into codes q by Sinkhorn-Knopp, an equal-partition assignment of the GLOBAL batch (and of a queue of past
embeddings) to the prototypes, computed without gradient; every other crop v predicts those codes:

    l(q, s_v) = - sum_k q_k log softmax(s_v / tau)_k,
    loss      = mean over the 2 global crops i of mean over the crops v != i of mean over images of l(q_i, s_v)

(Eq. 1 and 3 of the paper; the official code's averaging). Sinkhorn (Eq. 3, the official distributed_sinkhorn):
Q = exp(S / eps)^T (K x B), then `sinkhorn_iterations` times: rows to sum 1/K, columns to sum 1/B, with the sums
taken over ALL ranks (B counts every rank's rows); codes = B x Q^T, each image's code summing to 1.

The paper's Algorithm 1 in this file:
    z = normalize(g(f(x))) for every crop         SwAV.forward: one backbone pass per crop resolution
    scores = z . C (C: unit-norm prototypes)      SwAV.forward, after normalize_prototypes() at each step's start
    q = sinkhorn(scores of each global crop)      swav_loss -> sinkhorn, no grad, with the queue's scores
    loss = cross-entropy of q with every other    swav_loss
           crop's softmax(scores / tau)
    update f, g and C (C frozen at first)         LARS / SGD step in train(); the prototypes' gradient is dropped
                                                  for the first freeze_prototypes_epochs
After training, only the backbone f is kept ("backbone" in the checkpoint): the representation that
knn_eval.py and linear_eval.py measure.

Where the official code's effective behaviour is followed rather than a literal reading, or departed from:
- The queue (official: each rank keeps its own queue_size / world_size past embeddings) is held whole on every
  rank here (the embeddings of all ranks, gathered as MoCo's keys) and each rank scores its own share of it
  (queue_size / world_size rows). Sinkhorn's sums run over all ranks, so what it sees is the union of the shares
  either way, and codes are identical to the official per-rank queues; the queue is then one buffer, the same on
  every rank, saved whole in the checkpoint and valid on any number of ranks. Like the official code, it starts
  empty at queue_start_epoch and is used from queue_size / global_batch steps later on, when full; a step
  skipped for a non-finite loss (--skip_nonfinite) enqueues nothing, so its rows keep their older content (zeros,
  during the first fill: uniform columns for Sinkhorn until they are overwritten).
- The scores (z and the prototypes' layer) and Sinkhorn are in fp32 whatever the precision (under the official
  apex O1 the scores and their division by eps were fp16, the exponential and Sinkhorn's sums fp32); Sinkhorn
  subtracts the largest score before the exponential (the same Q after its normalisation; no overflow at small
  eps). The trunk's features carry the precision's rounding, which 1/eps amplifies: at initialisation the codes
  are about 6 % (L1) from fp32's under bf16 autocast (tests/test_swav.py); fp16, the official precision
  (--precision fp16 on a GPU), rounds 8 times finer.
- Crops are resized bilinearly and blurred with a kernel of about 10% of the crop, below 96 px with 13 taps or not
  at all (small_image_blur; common/augment.py); the official code that published 72.7 % blurred with a 23-px
  kernel at every size (later PIL's radius).
- LARS by default neither decays nor adapts biases and norm parameters; decay_bias_and_norm: true decays and
  adapts every parameter, as solo-learn's SwAV run and the official apex LARC (trust 0.001, no clipping) did, and
  as both configs set. The prototypes' gradient is dropped for freeze_prototypes_epochs x steps_per_epoch steps
  (official: freeze_prototypes_niters, 5005 = one epoch at batch 256).

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python swav.py --config configs/swav.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 swav.py --config configs/swav.yaml
    torchrun --nproc_per_node=8 swav.py --config configs/swav_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/swav/last.pt --dataset cifar10 --data_dir data
"""
import math
import sys
import time
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common.augment import multi_crop
from common.backbones import backbone_args, build_backbone
from common.checkpoints import Checkpointer
from common.config import PretrainConfig, UsageError, parse_config, usage_errors
from common.distributed import close_distributed, init_distributed, lost_rank_errors
from common.knn import KnnMonitor
from common.loaders import pretrain_loader
from common.precision import autocast, resolve_precision
from common.probe import OnlineProbe
from common.run_folder import MetricLog, check_run, write_run_config
from common.step_metrics import StepMetrics


@dataclass
class Config(PretrainConfig):
    """SwAV's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the 2 global crops
    local_size: int = 18  # side of the local crops
    num_local: int = 6  # local crops per image (0: the 2 global crops only)
    augment: str = "sym"  # view preset of the global crops (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.14  # global crops: RandomResizedCrop scale (crop_min_scale, 1)
    local_min_scale: float = 0.05  # local crops: scale (local_min_scale, crop_min_scale)
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 2  # Linear layers of the projector g: (proj_layers - 1) x Linear-BN-ReLU, then Linear
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 128  # width of z (and of the prototypes)
    num_prototypes: int = 3000  # K: prototypes (clusters)
    temperature: float = 0.1  # tau of the predicted codes' softmax
    sinkhorn_eps: float = 0.05  # eps of Sinkhorn-Knopp: smaller gives sharper codes
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations
    freeze_prototypes_epochs: float = 2.0  # the prototypes' gradient is dropped for this many epochs (no update)
    queue_size: int = 3840  # past embeddings per global crop added to Sinkhorn's batch (0 = no queue); trimmed to a
    # multiple of the global batch
    queue_start_epoch: int = 50  # the queue fills from this epoch's first step on (0-based) and is used once full
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.6  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-6  # on weights; biases and norm parameters: see decay_bias_and_norm
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    out_dir: str = "runs/swav"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


# ---- model ----
def mlp(in_dim, hidden_dim, out_dim, layers=2, bias=True, last_bias=None, last_bn=None, hidden_bn=True):
    """The projector / predictor of every script, built one way: `layers` Linear layers in_dim -> hidden_dim
    -> ... -> out_dim, each but the last followed by BN and ReLU. The papers' heads differ only in the
    arguments: biases of the Linear layers (`bias`; `last_bias` for the output layer, default `bias`), a BN on
    the output too (`last_bn`: "affine", or "plain" for affine=False) and none on the hidden layers
    (`hidden_bn=False`: MoCo v2's and SupCon's official Linear-ReLU-Linear)."""
    if layers < 1:
        raise UsageError(f"a projector or predictor needs at least 1 layer, got {layers}")
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    blocks = []
    for d_in, d_out in zip(dims, dims[1:]):
        norm = [nn.BatchNorm1d(d_out)] if hidden_bn else []
        blocks += [nn.Linear(d_in, d_out, bias=bias), *norm, nn.ReLU(inplace=True)]
    blocks.append(nn.Linear(dims[-1], out_dim, bias=bias if last_bias is None else last_bias))
    if last_bn:
        blocks.append(nn.BatchNorm1d(out_dim, affine=last_bn == "affine"))
    return nn.Sequential(*blocks)


def multi_crop_forward(net, crops):
    """net applied to a list of crop batches (each n x C x H x W, the global crops first), one pass per run of
    crops of the same size, as the official code: BN statistics are those of all the crops of one resolution.
    Returns the outputs of every crop, stacked in crop order: (len(crops) x n) x width."""
    return torch.cat([net(torch.cat(list(same))) for _, same in groupby(crops, key=lambda x: x.shape[-2:])])


class SwAV(nn.Module):
    """The backbone f, the projector g, the prototypes C (a bias-free Linear layer: its rows are the K unit
    prototype vectors) and the queue (queue_size > 0: `queue`, 2 x queue_size x proj_dim, past embeddings of
    the 2 global crops of all ranks, zeros until filled) in one module, so that state_dict(), checkpoints and
    resume hold them all."""

    def __init__(self, cfg, queue_size=None):
        super().__init__()
        queue_size = cfg.queue_size if queue_size is None else queue_size  # train(): check_swav's, trimmed
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(2, queue_size, cfg.proj_dim) if queue_size else None)

    def forward(self, crops):
        h = multi_crop_forward(self.backbone, crops)  # V n x width: every crop, the 2 global ones first
        z = F.normalize(self.projector(h).float(), dim=1)  # V n x proj_dim, unit vectors
        with torch.autocast(z.device.type, enabled=False):  # Sinkhorn divides the scores by eps = 0.05: fp32
            return z, self.prototypes(z)  # V n x K: scores z . c_k

    @torch.no_grad()
    def normalize_prototypes(self):
        """Each prototype back to unit length (every step, before the forward, as the official code)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def queue_scores(self, rank, world_size):
        """This rank's share of the queue (queue_size / world_size rows of each global crop's queue) scored with
        the current prototypes: 2 x (queue_size / world_size) x K, no grad (targets only)."""
        share = self.queue.view(2, world_size, -1, self.queue.shape[2])[:, rank]
        return share @ self.prototypes.weight.T.float()


def check_swav(cfg, world_size, is_main):
    """The settings that only make sense together, checked before anything is built. Returns the queue size,
    trimmed to a multiple of the global batch as the official code does."""
    global_batch = cfg.batch_size * world_size
    if cfg.num_local < 0 or cfg.num_prototypes < 1 or cfg.sinkhorn_iterations < 1 or cfg.sinkhorn_eps <= 0:
        raise UsageError("num_local must be >= 0, num_prototypes and sinkhorn_iterations >= 1 and sinkhorn_eps > 0, "
                         f"got {cfg.num_local}, {cfg.num_prototypes}, {cfg.sinkhorn_iterations}, {cfg.sinkhorn_eps}")
    if not 0 < cfg.local_min_scale <= cfg.crop_min_scale < 1:
        raise UsageError("the crop scales must satisfy 0 < local_min_scale <= crop_min_scale < 1 (local crops take "
                         f"(local_min_scale, crop_min_scale)), got {cfg.local_min_scale} and {cfg.crop_min_scale}")
    queue_size = cfg.queue_size - cfg.queue_size % global_batch
    if cfg.queue_size < 0 or (cfg.queue_size and not queue_size):
        raise UsageError(f"queue_size {cfg.queue_size} holds no whole global batch of {global_batch} images; set it "
                         f"to 0 (no queue) or to a multiple of {global_batch}")
    if queue_size != cfg.queue_size and is_main:
        print(f"note: queue_size {cfg.queue_size} trimmed to {queue_size}, a multiple of the global batch "
              f"{global_batch}", flush=True)
    return queue_size


# ---- loss and cross-rank operations ----
@torch.no_grad()
def all_reduce_no_grad(x, op=dist.ReduceOp.SUM):
    """all_reduce in place over all ranks, no grad (targets only); returns x."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn(scores, eps, iterations):
    """Sinkhorn-Knopp over ALL ranks' rows, in fp32, no grad (targets only). scores: m x K, this rank's rows of
    the M x K matrix of every rank (M = m x world_size). Returns codes m x K: each row sums to 1; each prototype's
    share of the M rows (its column's sum / M) approaches 1/K with the iterations (3 only approach it)."""
    scores = scores.float() / eps
    Q = torch.exp(scores - all_reduce_no_grad(scores.max(), op=dist.ReduceOp.MAX)).T  # K x m
    K, M = Q.shape[0], Q.shape[1] * (dist.get_world_size() if dist.is_initialized() else 1)
    Q /= all_reduce_no_grad(Q.sum())
    for _ in range(iterations):
        Q /= all_reduce_no_grad(Q.sum(dim=1, keepdim=True))  # each prototype's total over all ranks' rows ...
        Q /= K  # ... becomes 1/K
        Q /= Q.sum(dim=0, keepdim=True)  # each row (image) ...
        Q /= M  # ... becomes 1/M
    return (Q * M).T


def swav_loss(scores, num_crops, temperature, eps, iterations, queue_scores=None):
    """scores: (num_crops x n) x K, the crops' scores stacked crop by crop, the 2 global crops first; queue_scores:
    2 x m x K, this rank's share of the queue scored (or None). Returns (loss, codes): the mean over the 2 global
    crops i of the mean over every other crop v of -sum_k q_ik log softmax(scores_v / temperature)_k, averaged
    over this rank's n images; codes (2 x n x K) are Sinkhorn's, from each global crop's scores (and the queue's,
    whose rows are dropped afterwards)."""
    scores = scores.float().view(num_crops, -1, scores.shape[-1])  # V x n x K
    n = scores.shape[1]
    log_p = F.log_softmax(scores / temperature, dim=2)  # V x n x K
    loss, codes = 0.0, []
    for i in range(2):
        target = scores[i].detach()  # sg(.): the codes get no gradient
        if queue_scores is not None:
            target = torch.cat([queue_scores[i], target])  # the queue's rows first, this batch's last
        q = sinkhorn(target, eps, iterations)[-n:]  # n x K
        cross_entropy = -(q * log_p).sum(2)  # V x n: every crop against global crop i's codes
        others = torch.cat([cross_entropy[:i], cross_entropy[i + 1:]])  # (V - 1) x n: every crop but i itself
        loss = loss + others.mean()  # mean over the other crops and the images
        codes.append(q)
    return loss / 2, torch.stack(codes)


@torch.no_grad()
def gather_no_grad(x):
    """all_gather along dim 0, no grad (targets only): keys, labels, what is never trained through."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x.detach()
    x = x.contiguous()  # NCCL takes contiguous tensors only (gloo does not check)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def enqueue(queue, keys, step):
    """This step's vectors (keys: n x d on each rank) of all ranks, in rank order, overwrite the oldest rows of
    queue (K x d), so the queue is the same on every rank. Step s writes rows [s N, (s + 1) N) mod K: no pointer
    to store, and resume is exact."""
    keys = F.normalize(gather_no_grad(keys).float(), dim=1)  # N x d, no grad (targets only)
    start = step * len(keys) % len(queue)
    queue[start:start + len(keys)] = keys


def code_stats(codes, num_prototypes):
    """Collapse signals, on the device: the mean entropy of an image's code (in nats; ln K: every image spread
    evenly over all prototypes, no assignment at all) and the fraction of the prototypes that some code of this
    rank's batch puts first, of those it could reach (min(2n, K); near 1 / 2n: one prototype for every image)."""
    entropy = -(codes * codes.clamp_min(1e-12).log()).sum(-1).mean()
    best = codes.argmax(-1).flatten()  # 2n
    used = torch.zeros(num_prototypes, device=codes.device).index_fill_(0, best, 1.0).sum()
    return entropy, used / min(len(best), num_prototypes)


def collapse_warning(stats, num_prototypes):
    """A one-line warning if an epoch's means show collapse: the loss pinned at ln K (every prototype scored
    alike), the codes' entropy at ln K (no image assigned), or the codes on few prototypes. None otherwise. A
    healthy start is close: at init the scores are small cosines, so the codes are soft (entropy ~0.97 ln K and
    a loss within 1% of ln K in the first epochs of the CIFAR recipe on real images, slowly falling), hence the
    tight margins."""
    ln_k = math.log(num_prototypes)
    loss, entropy, used = (stats[f"train/epoch_{name}"] for name in ("loss", "code_entropy", "prototypes_used"))
    if abs(loss - ln_k) < 0.002 * ln_k or entropy > 0.995 * ln_k or used < 0.05:
        return (f"warning: SwAV looks collapsed: loss {loss:.3f} and code entropy {entropy:.3f} against ln K = "
                f"{ln_k:.3f}, prototypes used {used:.3f}. Try a smaller --sinkhorn_eps, a longer "
                "--freeze_prototypes_epochs or a later --queue_start_epoch; see "
                "docs/troubleshooting.md#collapse-in-swav-or-dino")
    return None


# ---- optimizer and schedules ----
class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017, arXiv:1708.03888) as used by SimCLR, BYOL and Barlow Twins.

    For each weight matrix: d = grad + weight_decay * w, trust ratio q = eta * ||w|| / ||d||, then SGD with
    momentum on q * d. Parameters with ndim == 1 (biases, BN and LayerNorm weights) get neither weight decay nor
    adaptation, plain SGD with momentum (exclude_bias_and_norm, the default: SimCLR, BYOL, Barlow Twins, solo-
    learn); exclude_bias_and_norm=False decays and adapts them like the weights, as apex's LARC in the official
    SwAV code (with their group's weight_decay, which build_optimizer sets). With clip=True the adapted step is
    capped at the scheduled lr (q <- min(q / lr, 1)), as in apex's LARC "clip" mode and solo-learn. Differences
    from the others: SimCLR-TF's LARS selects the excluded variables by name, uses eta 0.001 without clipping and
    keeps the lr inside its momentum buffer; apex LARC computes the trust ratio as eta * ||w|| / (||g|| + wd *
    ||w||) rather than from ||g + wd * w||."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True, exclude_bias_and_norm=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      exclude_bias_and_norm=exclude_bias_and_norm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1 or not group["exclude_bias_and_norm"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    q = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    if group["clip"]:
                        q = (q / group["lr"]).clamp(max=1.0) if group["lr"] > 0 else torch.ones_like(q)
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:  # allocated once, at the first step
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(cfg, model, fixed_lr=()):
    """LARS, SGD or AdamW over the trained parameters (requires_grad), in the groups that set_lr schedules: weights
    (ndim > 1), and biases + norm parameters (ndim == 1) at lr x bias_lr_ratio, without weight decay unless
    decay_bias_and_norm (LARS then also adapts them, as apex's LARC). Parameters in `fixed_lr` keep the peak lr."""
    if cfg.optimizer not in ("lars", "sgd", "adamw"):
        raise UsageError(f"optimizer must be lars, sgd or adamw, got {cfg.optimizer!r}")
    fixed = {id(p) for p in fixed_lr}
    groups = []
    for is_fixed in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in fixed) == is_fixed]
        groups += [{"params": [p for p in params if p.ndim > 1], "lr_ratio": 1.0, "fixed_lr": is_fixed},
                   {"params": [p for p in params if p.ndim == 1], "lr_ratio": cfg.bias_lr_ratio, "fixed_lr": is_fixed,
                    "weight_decay": cfg.weight_decay if cfg.decay_bias_and_norm else 0.0}]
    groups = [group for group in groups if group["params"]]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                    clip=cfg.lars_clip, exclude_bias_and_norm=not cfg.decay_bias_and_norm)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(optimizer, lr, peak_lr):
    """This step's lr in every group: the scheduled lr (the peak lr in fixed_lr groups) x the group's lr_ratio."""
    for group in optimizer.param_groups:
        group["lr"] = (peak_lr if group["fixed_lr"] else lr) * group["lr_ratio"]


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Linear warm-up from 0 to peak_lr over warmup_steps, then a cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- training ----
def train(cfg):
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    is_main = rank == 0
    check_run(cfg)  # settings and run folder, before anything is loaded or written
    queue_size = check_swav(cfg, world_size, is_main)
    precision, why = resolve_precision(cfg.precision, device, is_main)  # "bf16" | "fp16" | "fp32", and why
    torch.manual_seed(cfg.seed)

    # ---- data ----
    views = multi_crop(cfg.augment, cfg.dataset, cfg.image_size, cfg.local_size, cfg.num_local,
                       global_scale=(cfg.crop_min_scale, 1.0), local_scale=(cfg.local_min_scale, cfg.crop_min_scale),
                       jitter=cfg.jitter, small_image_blur=cfg.small_image_blur)
    loader = pretrain_loader(cfg, views, rank, world_size, device)
    knn_monitor = KnnMonitor(cfg, rank, world_size, device, precision)  # checks the labelled splits now
    global_batch = cfg.batch_size * world_size
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.lr * global_batch / 256
    freeze_steps = round(cfg.freeze_prototypes_epochs * steps_per_epoch)
    queue_start = cfg.queue_start_epoch * steps_per_epoch  # the first step that enqueues
    queue_full = queue_start + queue_size // global_batch  # the first step that uses the queue
    num_crops = 2 + cfg.num_local
    schedule = dict(world_size=world_size, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps, peak_lr=peak_lr)

    # ---- model ----
    model = SwAV(cfg, queue_size).to(device)
    if world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    probe = OnlineProbe(cfg, model, loader.images, rank, world_size, device, precision)  # none if probe_every is 0

    # ---- resume and run folder ----
    log, metrics = MetricLog(cfg.out_dir, is_main, cfg.logger), StepMetrics(cfg.out_dir, precision, cfg.skip_nonfinite)
    checkpointer = Checkpointer(cfg, schedule, model, optimizer, scaler, metrics, probe, device, rank, world_size)
    step = checkpointer.resume()  # from the newest intact checkpoint in out_dir (see cfg.resume); 0: a new run
    write_run_config(cfg, is_main, precision=precision, precision_reason=why, **schedule)
    ddp_model = DDP(model) if world_size > 1 else model
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)

    # ---- loop ----
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        loader.sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.batch_size)  # batches done
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True)
        tic = time.time()
        for crops, labels in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            set_lr(optimizer, lr, peak_lr)
            crops = [x.to(device, non_blocking=True, memory_format=memory_format) for x in crops]
            model.normalize_prototypes()
            with autocast(device, precision):
                z, scores = ddp_model(crops)
            use_queue = model.queue is not None and step >= queue_full
            queue_scores = model.queue_scores(rank, world_size) if use_queue else None
            loss, codes = swav_loss(scores, num_crops, cfg.temperature, cfg.sinkhorn_eps, cfg.sinkhorn_iterations,
                                    queue_scores)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm
            if step < freeze_steps:  # the prototypes stay as they are (their gradient dropped, as the official code)
                model.prototypes.weight.grad = None
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            code_entropy, prototypes_used = code_stats(codes, cfg.num_prototypes)
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, code_entropy=code_entropy, prototypes_used=prototypes_used,
                           **probe_stats):
                scaler.step(optimizer)
                if model.queue is not None and step >= queue_start:  # this step's global-crop embeddings
                    for queue, embeddings in zip(model.queue, z.detach().view(num_crops, -1, z.shape[1])):
                        enqueue(queue, embeddings, step)  # replace the oldest (a skipped step enqueues nothing)
            scaler.update()
            step += 1
            save = checkpointer.due(step)  # every checkpoint_every_steps / _minutes, or after SIGTERM / SIGUSR1
            if step % cfg.log_every == 0 or save:  # the host sync (besides fp16's GradScaler): read, average, check
                stats = {**metrics.read(step), "train/lr": lr}
                log.write(step=step, epoch=epoch + 1, **stats)
                bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{lr:.3g}")
            if save:
                checkpointer.save(step)  # after a stop signal, it then exits (status 75)
        epoch_stats = metrics.read_epoch(step)
        log.write(step=step, epoch=epoch + 1, **epoch_stats,
                  **{"train/images_per_s": global_batch * len(loader) / (time.time() - tic)})
        warning = collapse_warning(epoch_stats, cfg.num_prototypes)
        if warning and is_main and epoch + 1 > cfg.freeze_prototypes_epochs:  # the prototypes have moved
            print(warning, file=sys.stderr, flush=True)
        checkpointer.save(step)  # before the kNN check: after a stop signal, it exits (status 75) at once
        knn_monitor.after_epoch(epoch + 1, step, model.backbone, log)
        probe.after_epoch(epoch + 1, step, log)
    log.report_paths()  # where the checkpoints and metrics are, and how to plot them
    close_distributed()


if __name__ == "__main__":
    with usage_errors(), lost_rank_errors():
        train(parse_config(Config))
