"""ReLIC: "Representation Learning via Invariant Causal Mechanisms".
Jovana Mitrovic, Brian McWilliams, Jacob Walker, Lars Buesing, Charles Blundell. ICLR 2021. arXiv:2010.07922.

Instance discrimination made invariant to the augmentations. For two augmentations a, b of each image of the
GLOBAL batch, an encoder f, a critic g (an MLP to 128-d) and phi(u, v) = the cosine of g(u) and g(v), the
distribution over the batch that augmentation pair (a, b) induces for image i is

    p^{do(ab)}(j | x_i) = exp(phi(f(x_i^a), h(x_j^b)) / tau) / sum_m exp(phi(f(x_i^a), h(x_m^b)) / tau),

and the loss (the paper's Eq. 3, over both orders (a, b) and (b, a) of the two views, averaged here) is

    L = mean_i mean_{(a,b)} [ -log p^{do(ab)}(i | x_i)  +  alpha KL( p^{do(ab)}(. | x_i) || p^{do(ba)}(. | x_i) ) ],

the InfoNCE of instance discrimination plus the invariance penalty: the KL between the similarity distributions
that the two augmentation orders induce for the same image. h is f itself (target_ema false: the paper's main
ReLIC, 70.3% on ImageNet), or an EMA copy of f and g (target_ema true: the paper's variant with a target
network, 74.8%), computed without gradient. No public code reproduces the paper; this follows its equations:
both distributions are full softmaxes over the global batch (not over the positives only), the KL is taken
between probabilities with log-softmaxes (not softmaxes) inside, and without a stop-gradient: the paper puts
none in Eq. 3, so with h = f both sides of the KL train f (with the target network, only the online side can).
Our choices, where the paper leaves them open: phi is the cosine of the critic's outputs over a temperature (the
paper's phi is a learned critic of unstated form), the critic g is Linear-BN-ReLU-Linear to 128-d (the paper's
"critic MLP"), and with target_ema the target h is an EMA of f and g (the EMA rate m from base_ema to 1, as BYOL).
Our values, named in the configs: alpha 1 (the paper's penalty weight), tau 0.1 on ImageNet (0.2 on CIFAR-10, as
the other contrastive recipes here).

The paper's objective in this file:
    x^a, x^b = a(x), b(x)                      two_views (common/augment.py), reproducible per (seed, epoch, image)
    u = g(f(x^a)), v = g(h(x^b))               ReLIC.forward: online critic outputs, and the target's (or the same)
    phi(u, v) / tau over the global batch      relic_loss: cosines against every rank's images (gathered with grad)
    -log p^{do(ab)}(i | x_i), both orders      relic_loss: cross-entropy with labels offset by rank ("nce")
    alpha KL(p^{do(ab)} || p^{do(ba)})         relic_loss: per image, between the two orders' rows ("kl")
    update f, g; h <- EMA(f, g) if target_ema  LARS / SGD step in train(); ReLIC.update_target(ema_at(step))
After training, only the backbone f is kept ("backbone" in the checkpoint): the representation that
knn_eval.py and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python relic.py --config configs/relic.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 relic.py --config configs/relic.yaml --batch_size 64
    torchrun --nproc_per_node=8 relic.py --config configs/relic_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/relic/last.pt --dataset cifar10 --data_dir data
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
from common.precision import autocast, resolve_precision
from common.probe import OnlineProbe
from common.run_folder import MetricLog, check_run, write_run_config
from common.step_metrics import StepMetrics


@dataclass
class Config(PretrainConfig):
    """ReLIC's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the random crops
    augment: str = "asym"  # view preset (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 2  # Linear layers of the critic g: (proj_layers - 1) x Linear-BN-ReLU, then Linear
    proj_hidden_dim: int = 2048  # width of the critic's hidden layers
    proj_dim: int = 128  # width of the critic's output
    temperature: float = 0.2  # tau of the similarity distributions
    alpha: float = 1.0  # weight of the KL invariance penalty
    target_ema: bool = False  # h: an EMA copy of f and g (the paper's target network) instead of f itself
    base_ema: float = 0.99  # with target_ema: EMA rate m of the target at step 0; a cosine up to 1
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.4  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-4  # on weights; biases and norm parameters: see decay_bias_and_norm
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    out_dir: str = "runs/relic"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


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


class ReLIC(nn.Module):
    """The encoder f (backbone), the critic g (projector) and, with target_ema, the target network h (target_backbone,
    target_projector: a copy with requires_grad=False whose parameters follow f and g, as BYOL's) in one module,
    so that state_dict(), checkpoints and resume hold them all."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f and g: the backbone and the critic
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers)
        self.target_backbone = self.target_projector = None
        if cfg.target_ema:  # h: the target network
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        # both views in one pass, as SimCLR: BN statistics cover both views' 2n images
        u1, u2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)  # n x proj_dim each: g(f(x^a))
        if self.target_backbone is None:  # h = f: the same outputs on both sides of phi
            return u1, u2, u1, u2
        with torch.no_grad():  # sg(.): the target network gets no gradient
            v1, v2 = self.target_projector(self.target_backbone(torch.cat([x1, x2]))).chunk(2)  # g(h(x^b))
        return u1, u2, v1, v2

    def update_target(self, m):
        if self.target_backbone is not None:
            ema_update(self.target_backbone, self.backbone, m)
            ema_update(self.target_projector, self.projector, m)


@torch.no_grad()
def ema_update(target, online, m):
    """xi <- m * xi + (1 - m) * theta for every parameter; buffers are left alone (see BYOL)."""
    for xi, theta in zip(target.parameters(), online.parameters(), strict=True):
        xi.mul_(m).add_(theta, alpha=1 - m)


# ---- loss and cross-rank operations ----
class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0, autograd-aware: the backward sums the gradients that every rank computed for
    the gathered tensor and returns this rank's slice, so negatives on other ranks train this rank's z."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()  # NCCL takes contiguous tensors only (gloo does not check)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # a copy (all_reduce works in place, never on autograd's own buffer), contiguous: the gradient of a
        # reshaped or transposed output has strides that NCCL rejects
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # sum over ranks
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return GatherWithGrad.apply(x)


def relic_loss(u1, u2, v1, v2, temperature, alpha):
    """The paper's Eq. 3 over the global batch, returned as (loss, nce, kl). u1, u2: n x d critic outputs g(f(x))
    of this rank's two views; v1, v2: those of h (the target network, or u1, u2 themselves when h = f).

    Order (1, 2): row i holds phi(u1_i, v2_j) / tau for every image j of the global batch, so its softmax is
    p^{do(12)}(. | x_i); order (2, 1) likewise from u2 and v1. nce is the mean over images and orders of
    -log p(i | x_i); kl the mean of KL(p^{do(12)} || p^{do(21)}) and KL(p^{do(21)} || p^{do(12)}); loss is
    nce + alpha kl. Means over this rank's n images: the mean over ranks is the global batch's loss."""
    n = len(u1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    u1, u2 = F.normalize(u1.float(), dim=1), F.normalize(u2.float(), dim=1)  # the loss in fp32
    v1, v2 = F.normalize(v1.float(), dim=1), F.normalize(v2.float(), dim=1)
    log_p12 = (u1 @ gather_with_grad(v2).T / temperature).log_softmax(dim=1)  # n x N: log p^{do(12)}(j | x_i)
    log_p21 = (u2 @ gather_with_grad(v1).T / temperature).log_softmax(dim=1)  # n x N: log p^{do(21)}(j | x_i)
    own = torch.arange(n, device=u1.device) + n * rank  # global index of this rank's images
    rows = torch.arange(n, device=u1.device)
    nce = -(log_p12[rows, own] + log_p21[rows, own]).mean() / 2
    kl_12 = (log_p12.exp() * (log_p12 - log_p21)).sum(dim=1)  # KL(p^{do(12)} || p^{do(21)}) per image
    kl_21 = (log_p21.exp() * (log_p21 - log_p12)).sum(dim=1)
    kl = (kl_12 + kl_21).mean() / 2
    return nce + alpha * kl, nce, kl


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


# ---- training ----
def train(cfg):
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    is_main = rank == 0
    check_run(cfg)  # settings and run folder, before anything is loaded or written
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
    model = ReLIC(cfg).to(device)
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
        for (x1, x2), labels in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            m = ema_at(step, total_steps, cfg.base_ema)  # the EMA rate after this step
            set_lr(optimizer, lr, peak_lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, precision):
                u1, u2, v1, v2 = ddp_model(x1, x2)
            loss, nce, kl = relic_loss(u1, u2, v1, v2, cfg.temperature, cfg.alpha)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, nce=nce, kl=kl, **probe_stats):
                scaler.step(optimizer)
                model.update_target(m)  # after the step (target_ema): xi <- m * xi + (1 - m) * theta
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
