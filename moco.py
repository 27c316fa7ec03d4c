"""MoCo: v1, v2 and v3 in one script, chosen by config.
v1: "Momentum Contrast for Unsupervised Visual Representation Learning". Kaiming He, Haoqi Fan, Yuxin Wu,
    Saining Xie, Ross Girshick. CVPR 2020. arXiv:1911.05722.
v2: "Improved Baselines with Momentum Contrastive Learning". Xinlei Chen, Haoqi Fan, Ross Girshick, Kaiming He.
    2020. arXiv:2003.04297.
v3: "An Empirical Study of Training Self-Supervised Vision Transformers". Xinlei Chen, Saining Xie, Kaiming He.
    ICCV 2021. arXiv:2104.02057.

A query encoder f_q (backbone, projector, and in v3 a predictor) is trained; a key encoder f_k (key_backbone,
key_projector) is its exponential moving average, xi <- m xi + (1 - m) theta (m = ema_at(step)),
and gives the keys without gradient. With q = f_q(view 1), its positive key k+ = f_k(view 2) and negatives k_j,
all L2-normalised, the loss of each query is InfoNCE with the positive at index 0:

    L_q = -log( exp(q . k+ / tau) / (exp(q . k+ / tau) + sum_j exp(q . k_j / tau)) )

v1 / v2 (version 1, 2): the negatives are a queue of the K most recent keys of ALL ranks (queue_size, a
multiple of the global batch). v1's head is one Linear layer (proj_layers 1), T 0.07, a step lr schedule; v2
adds the 2-layer MLP head, blur, the cosine schedule, T 0.2. The key encoder could tell its query's batch by its
BN statistics (the positive key shares them, the queue's negatives do not): the official code shuffles the keys'
images across GPUs ("shuffle-BN"). shuffle_bn does that with BN statistics over `bn_groups` groups of the global
batch, which is the official 8-GPU shuffle-BN on 8 ranks and the same training on any other number of ranks, in
one process too (the groups then run one after another, as lightly's split BN). symmetric: both views are
queries, each against the other's keys and its own queue (solo-learn's "v2+", 92.9% on CIFAR-10 with SyncBN
and no shuffle, the default recipe here), the two losses averaged.
v3 (version 3): no queue; the negatives are the keys of the other images of the GLOBAL batch (gathered from all
ranks without gradient, labels offset by rank), a predictor on the query branch, symmetric, and each direction
multiplied by 2 tau as in the official code: loss = 2 tau (L(q1, k2) + L(q2, k1)); m follows a per-step cosine
to 1; SyncBN on GPUs. ResNets with LARS, ViTs with AdamW, the fixed 2-D sin-cos position embedding and the
random patch projection kept frozen (configs/moco_v3_vit.yaml).

The papers' pseudo-code in this file (v1 Algorithm 1; v3 Algorithm 1):
    f_k.params = f_q.params                    MoCo.__init__: key_backbone / key_projector are deep copies
    q = f_q(x_q)                               MoCo.queries: backbone, projector (and v3's predictor)
    k = f_k(x_k).detach()                      MoCo.keys under torch.no_grad(), shuffle-BN when shuffle_bn
    l_pos = q.k+, l_neg = q.queue              moco_loss -> info_nce: logits [l_pos, l_neg] / T, label 0
    v3: logits = q . gather(k)^T, labels = arange(n) + n * rank    info_nce without a queue
    update(f_q.params)                         LARS / SGD / AdamW step in train()
    f_k.params = m f_k.params + (1 - m) f_q    MoCo.update_key_encoder(ema_at(step)) after the step
    enqueue(queue, k); dequeue(queue)          enqueue: the keys of all ranks overwrite the oldest ones
After training, only the query backbone is kept ("backbone" in the checkpoint): the representation that
knn_eval.py and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python moco.py --config configs/moco_v2.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 moco.py --config configs/moco_v3.yaml --batch_size 64
    torchrun --nproc_per_node=8 moco.py --config configs/moco_v2_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/moco_v2/last.pt --dataset cifar10 --data_dir data
"""
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common.augment import two_views
from common.backbones import backbone_args, build_backbone
from common.checkpoints import Checkpointer
from common.config import PretrainConfig, UsageError, parse_config, usage_errors
from common.distributed import close_distributed, init_distributed, lost_rank_errors
from common.knn import KnnMonitor
from common.loaders import pretrain_loader
from common.precision import autocast, resolve_precision, to_device
from common.probe import OnlineProbe
from common.run_folder import MetricLog, check_run, write_run_config
from common.step_metrics import StepMetrics


@dataclass
class Config(PretrainConfig):
    """MoCo's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the random crops
    augment: str = "sym_weak"  # view preset (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    pos_embed: str = "learned"  # ViT position embedding: learned | sincos (v3's fixed 2-D sine-cosine)
    freeze_patch_embed: bool = False  # ViT: keep the random patch projection fixed (v3's stop-grad-conv1)
    vit_init: str = "torchvision"  # ViTs' initial weights: torchvision | moco_v3 (the official code's: xavier-uniform)
    version: int = 2  # 1 | 2: negatives from a queue of keys; 3: the global batch's keys and a predictor
    symmetric: bool = True  # v1 / v2: both views are queries, one queue per view (v2+); v3 is always symmetric
    queue_size: int = 32768  # v1 / v2: keys in each queue (a multiple of the global batch)
    shuffle_bn: bool = False  # v1 / v2: keys from the global batch shuffled, BN statistics per group of it
    bn_groups: int = 8  # with shuffle_bn: groups of the global batch with their own BN statistics (x ranks)
    proj_layers: int = 2  # Linear layers of the projector: (proj_layers - 1) x Linear-BN-ReLU, then Linear
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 256  # width of q and k
    proj_bias: bool = True  # biases in the heads' Linear layers (v3's official heads have none)
    proj_hidden_bn: bool = True  # BN after the projector's hidden layers (v2's official MLP head has none)
    proj_last_bn: bool = False  # v3: a BN without affine parameters on the projector's output
    pred_hidden_dim: int = 4096  # v3: width of the predictor's hidden layer: Linear-BN-ReLU-Linear
    pred_last_bn: bool = False  # v3 ViT: a BN without affine parameters on the predictor's output too
    temperature: float = 0.2  # tau of InfoNCE
    base_ema: float = 0.99  # EMA rate m of the key encoder at step 0 ...
    final_ema: float = 0.999  # ... and at the last step, a cosine in between (v1 / v2 official: both 0.999)
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "sgd"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.3  # per 256 images: the peak lr is lr x global_batch / 256
    lr_drops: tuple[int, ...] = ()  # v1: epochs at which the lr drops 10x, instead of the cosine (e.g. 120 160)
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-4  # on weights; biases and norm parameters: see decay_bias_and_norm
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    out_dir: str = "runs/moco"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


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


class MoCo(nn.Module):
    """The query encoder (backbone, projector, predictor: nn.Identity before v3), the key encoder (key_backbone,
    key_projector) and the queues (v1 / v2: `queue`, views x queue_size x proj_dim, L2-normalised keys) in one
    module, so that state_dict(), checkpoints and resume hold them all. The queues start as random unit vectors,
    as in the official code. The key encoder starts as a copy of the query encoder with requires_grad=False; only
    its parameters follow (update_key_encoder); its BN buffers are its own, from its train-mode forward."""

    def __init__(self, cfg, world_size=1):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f_q: the query encoder
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual,
                                              pos_embed=cfg.pos_embed, freeze_patch_embed=cfg.freeze_patch_embed,
                                              vit_init=cfg.vit_init)
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, bias=cfg.proj_bias,
                             last_bn="plain" if cfg.proj_last_bn else None, hidden_bn=cfg.proj_hidden_bn)
        self.predictor = nn.Identity()
        if cfg.version == 3:
            self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, bias=cfg.proj_bias,
                                 last_bn="plain" if cfg.pred_last_bn else None)
        # f_k: the key encoder
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        queue = None  # v1 / v2: queue[0] holds keys of view 2 (q1's negatives), queue[1] keys of view 1 (q2's)
        if cfg.version < 3:
            views = 2 if cfg.symmetric else 1
            queue = F.normalize(torch.randn(views, cfg.queue_size, cfg.proj_dim), dim=2)
        self.register_buffer("queue", queue)
        self.symmetric = cfg.symmetric or cfg.version == 3
        self.shuffle_bn, self.seed = cfg.shuffle_bn, cfg.seed
        self.groups = cfg.bn_groups // world_size if cfg.shuffle_bn else 1  # BN groups in this rank's batch

    def forward(self, x1, x2, step):
        # one pass per view, as in the official code: BN statistics are those of one view's images
        q1 = self.queries(x1)  # n x proj_dim
        q2 = self.queries(x2) if self.symmetric else None
        with torch.no_grad():  # the keys get no gradient
            k2 = self.keys(x2, 2 * step + 1)  # n x proj_dim
            k1 = self.keys(x1, 2 * step) if self.symmetric else None
        return q1, q2, k1, k2

    def queries(self, x):
        """q = predictor(projector(backbone(x))), BN statistics per group of images (shuffle_bn)."""
        return torch.cat([self.predictor(self.projector(self.backbone(part))) for part in x.chunk(self.groups)])

    def keys(self, x, draw):
        """k = key_projector(key_backbone(x)). With shuffle_bn, the official shuffle-BN: the images of the global
        batch are permuted (the same permutation on every rank: drawn from (seed, draw)), this rank encodes its
        share of them in BN groups, and the keys are gathered and put back in order."""
        if not self.shuffle_bn:
            return self.key_projector(self.key_backbone(x))
        rank = dist.get_rank() if dist.is_initialized() else 0
        images = gather_no_grad(x)  # N x C x H x W: the global batch
        # drawn on the host (the same permutation on every rank, whatever its GPU), copied without waiting
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        order = to_device(torch.randperm(len(images), generator=generator), x.device)  # shuffled position -> image
        mine = order.view(-1, len(x))[rank]  # this rank's share of the shuffled batch
        k = torch.cat([self.key_projector(self.key_backbone(part)) for part in images[mine].chunk(self.groups)])
        shuffled = gather_no_grad(k)  # N x proj_dim, in shuffled order
        restored = torch.empty_like(shuffled)
        restored[order] = shuffled  # back to the order of the images
        return restored.view(-1, len(x), k.shape[1])[rank]

    def update_key_encoder(self, m):
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)


@torch.no_grad()
def ema_update(target, online, m):
    """xi <- m * xi + (1 - m) * theta for every parameter; buffers are left alone (see BYOL)."""
    for xi, theta in zip(target.parameters(), online.parameters(), strict=True):
        xi.mul_(m).add_(theta, alpha=1 - m)


def check_moco(cfg, world_size):
    """The settings that only make sense together, checked before anything is built."""
    global_batch = cfg.batch_size * world_size
    if cfg.version not in (1, 2, 3):
        raise UsageError(f"version must be 1, 2 or 3, got {cfg.version}")
    if cfg.version < 3 and (cfg.queue_size <= 0 or cfg.queue_size % global_batch):
        raise UsageError(f"queue_size {cfg.queue_size} must be a positive multiple of the global batch "
                         f"{global_batch} ({cfg.batch_size} x {world_size} ranks), so that the keys of every step "
                         f"fill whole rows; e.g. --queue_size {max(1, cfg.queue_size // global_batch) * global_batch}")
    if cfg.lr_drops and cfg.warmup_epochs:
        raise UsageError("lr_drops replaces the cosine and its warm-up: set --warmup_epochs 0 (v1 has none)")
    if cfg.shuffle_bn and cfg.version == 3:
        raise UsageError("shuffle_bn is for the queue of v1 / v2; v3 uses SyncBatchNorm: set --shuffle_bn false")
    if cfg.shuffle_bn and (cfg.bn_groups < 2 or cfg.bn_groups % world_size or cfg.batch_size * world_size
                           % cfg.bn_groups):
        raise UsageError(f"shuffle_bn needs bn_groups >= 2, a multiple of the {world_size} ranks that divides the "
                         f"global batch {global_batch}; got --bn_groups {cfg.bn_groups}")


# ---- loss and cross-rank operations ----
@torch.no_grad()
def gather_no_grad(x):
    """all_gather along dim 0, no grad (targets only): keys, labels, what is never trained through."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x.detach()
    x = x.contiguous()  # NCCL takes contiguous tensors only (gloo does not check)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def info_nce(q, k, temperature, queue=None):
    """-log softmax of each query's positive key, averaged over this rank's n queries, and the instance
    discrimination's accuracy (instance_accuracy). q, k: n x d (any scale); queue: K x d unit vectors, the
    negatives (v1 / v2); without it (v3), the keys of the whole global batch."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)  # the loss in fp32
    if queue is not None:  # the positive first, then the queue: label 0
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature  # n x (1 + K)
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    else:
        rank = dist.get_rank() if dist.is_initialized() else 0
        logits = q @ gather_no_grad(k).T / temperature  # n x N: every key of the global batch
        labels = torch.arange(len(q), device=q.device) + len(q) * rank
    return F.cross_entropy(logits, labels), instance_accuracy(logits, labels)


@torch.no_grad()
def instance_accuracy(logits, labels):
    """The share (%) of queries whose positive key scores highest (top-1) and is among the five highest (top-5), as
    the official code logs them: a tensor of 2 on the device, read with the loss. Near 100 % from the first epochs
    means the positive is found by a shortcut, such as BatchNorm statistics shared within the batch."""
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([hits[:, 0].float().mean(), hits.any(1).float().mean()]) * 100


def moco_loss(q1, q2, k1, k2, temperature, queue=None):
    """MoCo's loss for one step, and the instance discrimination's top-1 / top-5 (%, averaged over the directions).
    q1, q2: n x d queries of views 1 and 2 (q2 None for v1 / v2 without symmetric); k1, k2: n x d keys; queue:
    views x K x d (v1 / v2) or None (v3).
    v1 / v2: L(q1, k2, queue[0]), or with both views the mean of L(q1, k2, queue[0]) and L(q2, k1, queue[1]).
    v3: 2 tau (L(q1, k2) + L(q2, k1)), the official code's scale, against the keys of the global batch."""
    if queue is None:
        (l12, a12), (l21, a21) = info_nce(q1, k2, temperature), info_nce(q2, k1, temperature)
        return 2 * temperature * (l12 + l21), (a12 + a21) / 2
    if q2 is None:
        return info_nce(q1, k2, temperature, queue[0])
    (l12, a12), (l21, a21) = info_nce(q1, k2, temperature, queue[0]), info_nce(q2, k1, temperature, queue[1])
    return (l12 + l21) / 2, (a12 + a21) / 2


@torch.no_grad()
def enqueue(queue, keys, step):
    """This step's vectors (keys: n x d on each rank) of all ranks, in rank order, overwrite the oldest rows of
    queue (K x d), so the queue is the same on every rank. Step s writes rows [s N, (s + 1) N) mod K: no pointer
    to store, and resume is exact."""
    keys = F.normalize(gather_no_grad(keys).float(), dim=1)  # N x d, no grad (targets only)
    start = step * len(keys) % len(queue)
    queue[start:start + len(keys)] = keys


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


def ema_at(step, total_steps, base_ema, final_ema=1.0):
    """The EMA rate m after step `step` (0 = the first): base_ema at step 0, a cosine up to final_ema at total_steps."""
    return final_ema - (final_ema - base_ema) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


def step_lr_at(step, steps_per_epoch, peak_lr, lr_drops):
    """MoCo v1's schedule: peak_lr, divided by 10 at the start of each epoch in lr_drops (120 and 160 of 200)."""
    return peak_lr * 0.1 ** sum(step >= epoch * steps_per_epoch for epoch in lr_drops)


def ddp_without_queue(model, world_size):
    """The model under DDP (itself in one process). DDP broadcasts rank 0's buffers at each forward: the BN running
    statistics, so that every rank evaluates (kNN monitor, checkpoint) with the same ones, as the official code's
    DDP does; but not the queue (and its labels), the same on every rank already (enqueue) and tens of MB."""
    if world_size == 1:
        return model
    queues = [name for name, _ in model.named_buffers() if name.startswith("queue")]
    DDP._set_params_and_buffers_to_ignore_for_model(model, queues)  # torch's way to leave buffers out of DDP
    return DDP(model)


# ---- training ----
def train(cfg):
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    is_main = rank == 0
    check_run(cfg)  # settings and run folder, before anything is loaded or written
    check_moco(cfg, world_size)
    precision, why = resolve_precision(cfg.precision, device, is_main)  # "bf16" | "fp16" | "fp32", and why
    torch.manual_seed(cfg.seed)

    # ---- data ----
    views = two_views(cfg.augment, cfg.image_size, cfg.dataset, scale=(cfg.crop_min_scale, 1.0), jitter=cfg.jitter,
                      small_image_blur=cfg.small_image_blur)
    loader = pretrain_loader(cfg, views, rank, world_size, device)
    knn_monitor = KnnMonitor(cfg, rank, world_size, device, precision)  # checks the labelled splits now
    global_batch = cfg.batch_size * world_size
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.lr * global_batch / 256
    schedule = dict(world_size=world_size, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps, peak_lr=peak_lr)

    # ---- model ----
    model = MoCo(cfg, world_size).to(device)
    if world_size > 1 and device.type == "cuda" and not cfg.shuffle_bn:  # shuffle-BN: BN per group
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
    ddp_model = ddp_without_queue(model, world_size)
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)

    # ---- loop ----
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        loader.sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.batch_size)  # batches done
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True)
        tic = time.time()
        for (x1, x2), labels in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            m = ema_at(step, total_steps, cfg.base_ema, cfg.final_ema)  # the EMA rate after this step
            if cfg.lr_drops:
                lr = step_lr_at(step, steps_per_epoch, peak_lr, cfg.lr_drops)
            set_lr(optimizer, lr, peak_lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, precision):
                q1, q2, k1, k2 = ddp_model(x1, x2, step)
            loss, accuracy = moco_loss(q1, q2, k1, k2, cfg.temperature, model.queue)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, instance_top1=accuracy[0], instance_top5=accuracy[1],
                           **probe_stats):
                scaler.step(optimizer)
                if model.queue is not None:  # after the loss, this step's keys replace the oldest (view 2's in
                    for queue, keys in zip(model.queue, (k2, k1)):  # queue 0, view 1's in 1); a skipped step
                        enqueue(queue, keys, step)  # (--skip_nonfinite) leaves the queue as it was
                # after the step, for the next step's keys (the official v3 moves the key encoder at the start of
                # the next step with that step's rate: one step later on the cosine, 1.6e-7 apart at most)
                model.update_key_encoder(m)
            scaler.update()
            step += 1
            save = checkpointer.due(step)  # every checkpoint_every_steps / _minutes, or after SIGTERM / SIGUSR1
            if step % cfg.log_every == 0 or save:  # the host sync (besides fp16's GradScaler): read, average, check
                stats = {**metrics.read(step), "train/lr": lr, "schedule/ema": m}
                log.write(step=step, epoch=epoch + 1, **stats)
                bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{lr:.3g}")
            if save:
                checkpointer.save(step)  # after a stop signal, it then exits (status 75)
        log.write(step=step, epoch=epoch + 1, **metrics.read_epoch(step),
                  **{"train/images_per_s": global_batch * len(loader) / (time.time() - tic)})
        checkpointer.save(step)  # before the kNN check: after a stop signal, it exits (status 75) at once
        knn_monitor.after_epoch(epoch + 1, step, model.backbone, log)
        probe.after_epoch(epoch + 1, step, log)
    log.report_paths()  # where the checkpoints and metrics are, and how to plot them
    close_distributed()


if __name__ == "__main__":
    with usage_errors(), lost_rank_errors():
        train(parse_config(Config))
