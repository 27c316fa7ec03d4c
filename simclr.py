"""SimCLR: "A Simple Framework for Contrastive Learning of Visual Representations".
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton. ICML 2020. arXiv:2002.05709.

Each image x gives two random views; the encoder f (backbone) and projector g map them to z = g(f(view)).
Over the 2N projections of a GLOBAL batch of N images (negatives come from every rank), the NT-Xent loss
of the positive pair (i, j) is

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),  sim = cosine,

averaged over all 2N anchors (Algorithm 1 of the paper). The official code sums the means of the two views'
anchors, twice this loss: loss_scale 2 in configs/simclr_imagenet.yaml.

The paper's Algorithm 1 in this file:
    x~_2k-1 = t(x_k), x~_2k = t'(x_k)          two_views (common/augment.py), reproducible per (seed, epoch, image)
    h = f(x~); z = g(h)                         SimCLR.forward: both views in one pass
    s_ij = z_i . z_j / (||z_i|| ||z_j||)        simclr_loss: z normalised, candidates gathered from every rank
    L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]  simclr_loss: cross-entropy over the 2N anchors, self excluded
    update f and g to minimise L                LARS / SGD step in train()
After training, only the backbone f is kept ("backbone" in the checkpoint): the representation that
knn_eval.py and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python simclr.py --config configs/simclr.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 simclr.py --config configs/simclr.yaml
    torchrun --nproc_per_node=8 simclr.py --config configs/simclr_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/simclr/last.pt --dataset cifar10 --data_dir data
"""
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
    """SimCLR's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the random crops
    augment: str = "sym"  # view preset (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 2  # Linear layers of the projector g: (proj_layers - 1) x Linear-BN-ReLU, then Linear
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 256  # width of z
    proj_bias: bool = True  # biases in g's Linear layers (the official code has none: a BN follows each)
    proj_hidden_bn: bool = True  # BN after g's hidden layers (the official code's; solo-learn's CIFAR head has none)
    proj_last_bn: bool = False  # a BN on g's output that scales but does not shift, as in the official code
    temperature: float = 0.2  # tau of NT-Xent
    loss_scale: float = 1.0  # the loss is multiplied by this (2: the official sum over the two views' anchors)
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
    out_dir: str = "runs/simclr"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


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


class SimCLR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f and g: the backbone and the projector
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, bias=cfg.proj_bias,
                             last_bn="affine" if cfg.proj_last_bn else None, hidden_bn=cfg.proj_hidden_bn)
        if cfg.proj_last_bn:  # TF's center=False: the official output BN has a scale but no offset
            self.projector[-1].bias.requires_grad_(False)

    def forward(self, x1, x2):
        # both views in one pass, as in the official code: BN statistics cover both views' 2n images
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # 2n x proj_dim
        return z.chunk(2)  # z1, z2: n x proj_dim each


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


def simclr_loss(z1, z2, temperature):
    """NT-Xent over the global batch. z1, z2: n x d projections of this rank's two views.

    Returns the mean over this rank's 2n anchors; with equal batches on every rank the mean over ranks is
    the loss of the global batch, and DDP's gradient averaging turns it into that loss's gradient."""
    n = z1.shape[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # the loss in fp32
    anchors = torch.cat([z1, z2])  # 2n x d
    candidates = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # 2N x d: views 1, then views 2
    N = candidates.shape[0] // 2
    logits = anchors @ candidates.T / temperature  # 2n x 2N
    idx = torch.arange(n, device=z1.device) + n * rank  # global index of this rank's images
    self_column = torch.cat([idx, idx + N])  # k != i: an anchor is not its own negative
    positive = torch.cat([idx + N, idx])  # view 1 of image i pairs with view 2 of image i, and back
    logits = logits.scatter(1, self_column[:, None], float("-inf"))  # row i's own column out (no host copy)
    return F.cross_entropy(logits, positive)


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
    model = SimCLR(cfg).to(device)
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
            set_lr(optimizer, lr, peak_lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(device, precision):
                z1, z2 = ddp_model(x1, x2)
            loss = cfg.loss_scale * simclr_loss(z1, z2, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, **probe_stats):
                scaler.step(optimizer)
            scaler.update()
            step += 1
            save = checkpointer.due(step)  # every checkpoint_every_steps / _minutes, or after SIGTERM / SIGUSR1
            if step % cfg.log_every == 0 or save:  # the host sync (besides fp16's GradScaler): read, average, check
                stats = {**metrics.read(step), "train/lr": lr}
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
