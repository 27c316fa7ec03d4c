"""DINO: "Emerging Properties in Self-Supervised Vision Transformers".
Mathilde Caron, Hugo Touvron, Ishan Misra, Herve Jegou, Julien Mairal, Piotr Bojanowski, Armand Joulin.
ICCV 2021. arXiv:2104.14294.

Self-distillation with no labels. Each image gives V crops: 2 global ones and V - 2 smaller local ones
(multi-crop). A student g_s (backbone + DINO head) sees every crop; a teacher g_t, an exponential moving average
of the student that gets no gradient, sees the 2 global crops only. The teacher's outputs are centred and
sharpened, the student's softened, and the student matches the teacher across crops:

    P_t(x) = softmax((g_t(x) - c) / tau_t),   P_s(x') = softmax(g_s(x') / tau_s),
    loss   = mean over the 2 global crops x of mean over the crops x' != x of mean over images of
             H(P_t(x), P_s(x')) = - sum_k P_t(x)_k log P_s(x')_k                          (Eq. 2, Alg. 1)

then c <- m c + (1 - m) mean of g_t over the global crops of the GLOBAL batch (all ranks), and
theta_t <- m theta_t + (1 - m) theta_s after each optimizer step (the EMA rate m, the paper's lambda: a cosine from
base_ema to 1).

The paper's Algorithm 1 in this file:
    s1, s2, ... = gs(x1), gs(x2), ...           DINO.forward: student on every crop, one pass per resolution
    t1, t2 = gt(x1), gt(x2)                     DINO.forward, under torch.no_grad(): teacher on the 2 global crops
    loss = H(t1, s2..)/2 + H(t2, s1, s3..)/2    dino_loss: t = softmax((t - C) / tau_t) detached, s log-softmaxed
    update(gs)                                  AdamW / LARS / SGD step in train() (per-parameter gradient clip)
    gt.params = m gt.params + (1 - m) gs.params DINO.update_teacher(m) -> ema_update; m = ema_at(step)
    C = m C + (1 - m) cat([t1, t2]).mean(0)     update_center, the mean over ALL ranks
After training, the teacher's backbone is kept ("backbone" in the checkpoint, as the official evaluation uses
the teacher): the representation that knn_eval.py and linear_eval.py measure.

The head (DINOHead): an MLP with GELU (hidden 2048, a 256-d bottleneck), L2-normalised, then a weight-normalised
bias-free Linear to K outputs whose norm is fixed at 1 (norm_last_layer) and which gets no update for the first
freeze_last_layer_epochs. Schedules, per step: lr (warm-up, cosine to min_lr), weight decay (cosine from
weight_decay to weight_decay_end, on weights only), the teacher's EMA rate, the teacher temperature (linear
warm-up from warmup_teacher_temperature, then constant).

Where the official code's effective behaviour is followed, or departed from:
- Gradient clipping is per parameter (each parameter's gradient scaled to norm <= clip_grad), as the official
  clip_gradients, not torch's clip of the total norm.
- The teacher temperature's warm-up is per step (official: per epoch, a linspace over the warm-up epochs).
- The head's last layer runs in fp32 whatever the precision (the official code ran it under fp16 autocast): its
  outputs are divided by tau_t = 0.04. The center and the teacher move only on applied steps (--skip_nonfinite).
- ResNets: the teacher's BN statistics are its own, from its train-mode forward, as in the official code.
- Crops are resized bilinearly (official: bicubic) and blurred with a kernel of about 10% of the crop
  (common/augment.py; official: PIL's unbounded Gaussian).

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python dino.py --config configs/dino.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 dino.py --config configs/dino_vit.yaml
    torchrun --nproc_per_node=8 dino.py --config configs/dino_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/dino/last.pt --dataset cifar10 --data_dir data
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
from torch.nn.utils.parametrizations import weight_norm
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
    """DINO's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the 2 global crops
    local_size: int = 16  # side of the local crops
    num_local: int = 6  # local crops per image (0: the 2 global crops only)
    augment: str = "asym"  # view preset of the global crops (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.14  # global crops: RandomResizedCrop scale (crop_min_scale, 1)
    local_min_scale: float = 0.05  # local crops: scale (local_min_scale, crop_min_scale)
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    drop_path: float = 0.0  # ViTs: stochastic depth of the student (the teacher has none), rising to this rate
    vit_init: str = "torchvision"  # ViTs' initial weights: torchvision | dino (the official code's: trunc normal 0.02)
    proj_layers: int = 3  # Linear layers of the head's MLP (DINOHead): (proj_layers - 1) x Linear-(BN)-GELU, Linear
    proj_hidden_dim: int = 2048  # width of the head's hidden layers
    proj_dim: int = 256  # width of the head's bottleneck, L2-normalised before the last layer
    proj_bn: bool = False  # a BN after each hidden Linear of the head (official: off)
    num_prototypes: int = 4096  # K: outputs of the head's last layer
    norm_last_layer: bool = True  # the last layer's weight norm fixed at 1 (false: learnt; official ViT-S boost)
    freeze_last_layer_epochs: float = 1.0  # the last layer's gradient is dropped for this many epochs (no update)
    student_temperature: float = 0.1  # tau_s
    teacher_temperature: float = 0.07  # tau_t after its warm-up
    warmup_teacher_temperature: float = 0.04  # tau_t at step 0, rising linearly to teacher_temperature ...
    warmup_teacher_temperature_epochs: float = 50.0  # ... over this many epochs
    center_momentum: float = 0.9  # m of the center's moving average
    base_ema: float = 0.9995  # EMA rate m of the teacher at step 0; a cosine up to 1 at the last step
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.3  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-6  # on weights at step 0 (biases and norm parameters: see decay_bias_and_norm) ...
    weight_decay_end: float = 1e-6  # ... a cosine to this at the last step (official ViT recipe: 0.04 -> 0.4)
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    clip_grad: float = 3.0  # each parameter's gradient clipped to this norm (0 = off)
    out_dir: str = "runs/dino"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


# ---- model ----
def multi_crop_forward(net, crops):
    """net applied to a list of crop batches (each n x C x H x W, the global crops first), one pass per run of
    crops of the same size, as the official code: BN statistics are those of all the crops of one resolution.
    Returns the outputs of every crop, stacked in crop order: (len(crops) x n) x width."""
    return torch.cat([net(torch.cat(list(same))) for _, same in groupby(crops, key=lambda x: x.shape[-2:])])


class DINOHead(nn.Module):
    """The official DINO head: MLP (Linear-(BN)-GELU x (layers - 1), Linear to the bottleneck; weights drawn from
    a truncated normal of std 0.02, biases 0), L2-normalised, then last_layer: a weight-normalised bias-free Linear
    to K outputs, its norm g = 1 and fixed with norm_last_layer. The last layer runs in fp32."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim, layers=3, bn=False, norm_last_layer=True):
        super().__init__()
        if layers < 1:
            raise UsageError(f"the DINO head needs at least 1 layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1)
        blocks = []
        for d_in, d_out in zip(dims, dims[1:]):
            blocks += [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], bottleneck_dim))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))  # weight = g v / ||v||
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x).float(), dim=-1)  # n x bottleneck, unit vectors
        with torch.autocast(x.device.type, enabled=False):  # logits divided by tau_t = 0.04: in fp32
            return self.last_layer(x)  # n x K


class DINO(nn.Module):
    """The student (backbone, head) and the teacher (teacher_backbone, teacher_head), and the center (a buffer,
    1 x K) in one module, so that state_dict(), checkpoints and resume hold them all. The teacher starts as the
    student's weights (built without stochastic depth) with requires_grad=False: the optimizer never sees it;
    only its parameters follow the student's (update_teacher)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual,
                                              drop_path=cfg.drop_path, vit_init=cfg.vit_init)
        self.head = DINOHead(width, cfg.proj_hidden_dim, cfg.proj_dim, cfg.num_prototypes,
                             cfg.proj_layers, cfg.proj_bn, cfg.norm_last_layer)
        self.teacher_backbone, _ = build_backbone(**self.backbone_args)
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_backbone.requires_grad_(False)
        self.teacher_head = DINOHead(width, cfg.proj_hidden_dim, cfg.proj_dim, cfg.num_prototypes,
                                     cfg.proj_layers, cfg.proj_bn, cfg.norm_last_layer)
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_head.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.num_prototypes))

    def forward(self, crops):
        student_out = self.head(multi_crop_forward(self.backbone, crops))  # V n x K: every crop, global first
        with torch.no_grad():  # the teacher gets no gradient
            teacher_out = self.teacher_head(multi_crop_forward(self.teacher_backbone, crops[:2]))  # 2 n x K
        return student_out, teacher_out

    @property
    def kept_backbone(self):
        """The trunk the checkpoint keeps for evaluation: the teacher's, as the official evaluation."""
        return self.teacher_backbone

    def update_teacher(self, m):
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)


@torch.no_grad()
def ema_update(target, online, m):
    """xi <- m * xi + (1 - m) * theta for every parameter; buffers are left alone (see BYOL)."""
    for xi, theta in zip(target.parameters(), online.parameters(), strict=True):
        xi.mul_(m).add_(theta, alpha=1 - m)


def check_dino(cfg):
    """The settings that only make sense together, checked before anything is built."""
    if cfg.num_local < 0 or cfg.num_prototypes < 1:
        raise UsageError(f"num_local must be >= 0 and num_prototypes >= 1, got {cfg.num_local} and "
                         f"{cfg.num_prototypes}")
    if not 0 < cfg.local_min_scale <= cfg.crop_min_scale < 1:
        raise UsageError("the crop scales must satisfy 0 < local_min_scale <= crop_min_scale < 1 (local crops take "
                         f"(local_min_scale, crop_min_scale)), got {cfg.local_min_scale} and {cfg.crop_min_scale}")
    if min(cfg.student_temperature, cfg.teacher_temperature, cfg.warmup_teacher_temperature) <= 0:
        raise UsageError("student_temperature, teacher_temperature and warmup_teacher_temperature must be > 0")
    if cfg.arch.startswith("vit") and cfg.local_size % cfg.patch_size:
        raise UsageError(f"local_size {cfg.local_size} is not a multiple of patch_size {cfg.patch_size}")


# ---- loss and cross-rank operations ----
@torch.no_grad()
def all_reduce_no_grad(x, op=dist.ReduceOp.SUM):
    """all_reduce in place over all ranks, no grad (targets only); returns x."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


def dino_loss(student_out, teacher_out, center, student_temperature, teacher_temperature):
    """student_out: (V x n) x K, the student's outputs stacked crop by crop, the 2 global crops first; teacher_out:
    (2 x n) x K, the teacher's on the 2 global crops; center: 1 x K. Returns the mean over the 2 global crops i of
    the mean over every other crop v of -sum_k P_t(i)_k log P_s(v)_k, averaged over this rank's n images, with
    P_t = softmax((teacher - center) / teacher_temperature) (no gradient), P_s = softmax(student / student_temp.)."""
    n = len(teacher_out) // 2
    log_p = F.log_softmax(student_out.float() / student_temperature, dim=-1).view(-1, n, student_out.shape[-1])
    teacher = F.softmax((teacher_out.float() - center) / teacher_temperature, dim=-1).detach()  # sg(.)
    loss = 0.0
    for i, p_t in enumerate(teacher.view(2, n, -1)):
        cross_entropy = -(p_t * log_p).sum(-1)  # V x n: every crop against global crop i's target
        others = torch.cat([cross_entropy[:i], cross_entropy[i + 1:]])  # (V - 1) x n: every crop but i itself
        loss = loss + others.mean()  # mean over the other crops and the images
    return loss / 2


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """center <- momentum * center + (1 - momentum) * the mean of the teacher's outputs over ALL ranks' rows, no
    grad (targets only)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    batch_center = all_reduce_no_grad(teacher_out.float().sum(0, keepdim=True)) / (len(teacher_out) * world_size)
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


def teacher_stats(student_out, teacher_out, center, student_temperature, teacher_temperature):
    """Collapse signals (DINO's Fig. 7), on the device: the mean entropy h of the teacher's P_t (nats; ln K: uniform
    outputs) and the KL divergence from P_t to the student's P_s (the loss minus h, over the same pairs; near 0 in
    either collapse, uniform or one-dimensional)."""
    teacher = F.softmax((teacher_out.float() - center) / teacher_temperature, dim=-1)
    entropy = -(teacher * teacher.clamp_min(1e-12).log()).sum(-1).mean()
    return entropy, dino_loss(student_out.detach(), teacher_out, center, student_temperature,
                              teacher_temperature) - entropy


def collapse_warning(stats, num_prototypes):
    """A one-line warning if an epoch's means show collapse: the teacher's outputs near uniform, or the student
    matching the teacher exactly (KL near 0: every output the same). None otherwise."""
    ln_k = math.log(num_prototypes)
    entropy, kl = stats["train/epoch_teacher_entropy"], stats["train/epoch_kl"]
    if entropy > 0.98 * ln_k or kl < 1e-3:
        return (f"warning: DINO looks collapsed: teacher entropy {entropy:.3f} (ln K = {ln_k:.3f}), KL teacher -> "
                f"student {kl:.2g}. Try a lower --teacher_temperature or a longer "
                "--warmup_teacher_temperature_epochs; see docs/troubleshooting.md#collapse-in-swav-or-dino")
    return None


def clip_gradients(model, max_norm):
    """Each parameter's gradient scaled to a norm of at most max_norm, on its own (the official clip_gradients)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm() + 1e-6)).clamp(max=1.0))


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


def weight_decay_at(step, total_steps, start, end):
    """A cosine from start at step 0 to end at total_steps (DINO's ViT recipe: 0.04 -> 0.4)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def teacher_temperature_at(step, warmup_steps, start, end):
    """tau_t: linear from start at step 0 to end at warmup_steps, then end."""
    return end if step >= warmup_steps else start + (end - start) * step / warmup_steps


def set_weight_decay(optimizer, weight_decay, decay_bias_and_norm=False):
    """This step's weight decay in the weights' groups (and the biases' and norms' with decay_bias_and_norm)."""
    for group in optimizer.param_groups:
        if group["params"][0].ndim > 1 or decay_bias_and_norm:
            group["weight_decay"] = weight_decay


# ---- training ----
def train(cfg):
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    is_main = rank == 0
    check_run(cfg)  # settings and run folder, before anything is loaded or written
    check_dino(cfg)
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
    freeze_steps = round(cfg.freeze_last_layer_epochs * steps_per_epoch)
    temperature_warmup_steps = round(cfg.warmup_teacher_temperature_epochs * steps_per_epoch)
    schedule = dict(world_size=world_size, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps, peak_lr=peak_lr)

    # ---- model ----
    model = DINO(cfg).to(device)
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
            m = ema_at(step, total_steps, cfg.base_ema)  # the EMA rate after this step
            weight_decay = weight_decay_at(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
            teacher_temperature = teacher_temperature_at(step, temperature_warmup_steps,
                                                         cfg.warmup_teacher_temperature, cfg.teacher_temperature)
            set_lr(optimizer, lr, peak_lr)
            set_weight_decay(optimizer, weight_decay, cfg.decay_bias_and_norm)
            crops = [x.to(device, non_blocking=True, memory_format=memory_format) for x in crops]
            with autocast(device, precision):
                student_out, teacher_out = ddp_model(crops)
            loss = dino_loss(student_out, teacher_out, model.center, cfg.student_temperature, teacher_temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm and the clip
            if step < freeze_steps:  # the last layer stays as it is (its gradient dropped, as the official code)
                for p in model.head.last_layer.parameters():
                    p.grad = None
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            if cfg.clip_grad > 0:
                clip_gradients(model, cfg.clip_grad)
            teacher_entropy, kl = teacher_stats(student_out, teacher_out, model.center, cfg.student_temperature,
                                                teacher_temperature)
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, teacher_entropy=teacher_entropy, kl=kl, **probe_stats):
                scaler.step(optimizer)
                update_center(model.center, teacher_out, cfg.center_momentum)  # after the loss that used it
                model.update_teacher(m)  # after the step: teacher <- m * teacher + (1 - m) * student
            scaler.update()
            step += 1
            save = checkpointer.due(step)  # every checkpoint_every_steps / _minutes, or after SIGTERM / SIGUSR1
            if step % cfg.log_every == 0 or save:  # the host sync (besides fp16's GradScaler): read, average, check
                stats = {**metrics.read(step), "train/lr": lr, "schedule/ema": m,
                         "schedule/teacher_temperature": teacher_temperature, "schedule/weight_decay": weight_decay}
                log.write(step=step, epoch=epoch + 1, **stats)
                bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{lr:.3g}")
            if save:
                checkpointer.save(step)  # after a stop signal, it then exits (status 75)
        epoch_stats = metrics.read_epoch(step)
        log.write(step=step, epoch=epoch + 1, **epoch_stats,
                  **{"train/images_per_s": global_batch * len(loader) / (time.time() - tic)})
        warning = collapse_warning(epoch_stats, cfg.num_prototypes)
        if warning and is_main and epoch > 0:  # the first epoch starts from random outputs
            print(warning, file=sys.stderr, flush=True)
        checkpointer.save(step)  # before the kNN check: after a stop signal, it exits (status 75) at once
        knn_monitor.after_epoch(epoch + 1, step, model.kept_backbone, log)
        probe.after_epoch(epoch + 1, step, log)
    log.report_paths()  # where the checkpoints and metrics are, and how to plot them
    close_distributed()


if __name__ == "__main__":
    with usage_errors(), lost_rank_errors():
        train(parse_config(Config))
