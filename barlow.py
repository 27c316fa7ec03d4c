"""Barlow Twins: "Barlow Twins: Self-Supervised Learning via Redundancy Reduction".
Jure Zbontar, Li Jing, Ishan Misra, Yann LeCun, Stephane Deny. ICML 2021. arXiv:2103.03230.

Each image x gives two random views; the encoder f (backbone) and projector g map them to z_A = g(f(view A))
and z_B. Over the GLOBAL batch of N images (b indexes images on every rank), each dimension of z_A and z_B is
normalised to zero mean and unit variance, zhat = (z - mean_b z) / sqrt(var_b z + eps), and

    C_ij = (1/N) sum_b zhat_A[b, i] zhat_B[b, j],
    L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2,

times loss_scale in train() (0.1 in the CIFAR recipe, as solo-learn's; 1 in the paper).

The first term makes the two views agree dimension by dimension; the second decorrelates the dimensions.
There is no stop-gradient, no predictor and no target network: the twins share all their weights. The
gradient is the exact one of the global batch; the official code's is that divided by its number of GPUs
(configs/barlow_imagenet.yaml reproduces it with loss_scale 1/16).

The paper's Algorithm 1 in this file:
    z_a = f(y_a); z_b = f(y_b)                   BarlowTwins.forward (each view on its own, as the paper's code)
    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)   batch_normalize: global-batch statistics, biased variance
                                                  and eps 1e-5 as BatchNorm1d(affine=False) in the paper's code
                                                  (the pseudo-code's .std(0) is unbiased; the code is not)
    c = mm(z_a_norm.T, z_b_norm) / N              sum_over_ranks(z1.T @ z2, ...) / N in barlow_loss
    c_diff = (c - eye(D)).pow(2); off-diagonal    on_diag + lambd * off_diag
        elements * lambda; loss = c_diff.sum()
After training, only the backbone f is kept ("backbone" in the checkpoint): the representation that
knn_eval.py and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python barlow.py --config configs/barlow.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 barlow.py --config configs/barlow.yaml
    torchrun --nproc_per_node=8 barlow.py --config configs/barlow_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/barlow/last.pt --dataset cifar10 --data_dir data
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
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
    """Barlow Twins's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the random crops
    augment: str = "asym"  # view preset (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 3  # Linear layers of the projector g: (proj_layers - 1) x Linear-BN-ReLU, then Linear
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 2048  # width of z (D, the side of the cross-correlation matrix)
    lambd: float = 0.0051  # lambda: weight of the off-diagonal (redundancy reduction) term
    loss_scale: float = 0.1  # the loss is multiplied by this (solo-learn's scale_loss; 1.0 in the paper)
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.3  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-4  # on weights; biases and norm parameters: see decay_bias_and_norm
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    out_dir: str = "runs/barlow"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


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


class BarlowTwins(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f: the backbone
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        # g: no biases, as in the official code: a BN follows each hidden Linear, and the loss's normalisation
        # removes any constant offset of z
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, bias=False)

    def forward(self, x1, x2):
        # one pass per view, as in the official code: BN statistics are those of one view's n images. No
        # .detach() anywhere: the paper stops no gradient, both twins are trained.
        z1 = self.projector(self.backbone(x1))  # n x proj_dim
        z2 = self.projector(self.backbone(x2))  # n x proj_dim
        return z1, z2


# ---- loss and cross-rank operations ----
class SumOverRanks(torch.autograd.Function):
    """all_reduce SUM, autograd-aware. Every rank's loss depends on the sum, so the gradient that reaches this
    rank's x is the sum over ranks of the gradients arriving at the sum: backward all-reduces them. Where every
    rank computes the SAME function of the sum (same_on_every_rank: the loss from C), those gradients are
    equal, and their sum is world_size x this rank's, with no communication: for C that saves an all_reduce
    of d x d values per step (268 MB at d = 8192). A plain dist.all_reduce (the official code, solo-learn) lets
    no gradient through to other ranks' terms, which leaves the gradient off by 1/world_size once DDP
    averages it."""

    @staticmethod
    def forward(ctx, x, same_on_every_rank):
        ctx.same_on_every_rank = same_on_every_rank
        x = x.clone(memory_format=torch.contiguous_format)  # all_reduce works in place; NCCL: contiguous only
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        if ctx.same_on_every_rank:
            return grad * dist.get_world_size(), None
        # a copy (all_reduce works in place, never on autograd's own buffer), contiguous: the gradient of a
        # reshaped or transposed output has strides that NCCL rejects
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # sum over ranks
        return grad, None


def sum_over_ranks(x, same_on_every_rank=False):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return SumOverRanks.apply(x, same_on_every_rank)


def batch_normalize(z, N, eps=1e-5):
    """Zero mean and unit variance per dimension over the global batch of N rows, as BatchNorm1d(affine=False)
    in training mode (SyncBatchNorm in the official code): the biased variance (divided by N), eps inside the
    sqrt. Both statistics are summed over ranks, autograd-aware."""
    mean = sum_over_ranks(z.sum(0)) / N  # d
    var = sum_over_ranks((z - mean).pow(2).sum(0)) / N  # d
    return (z - mean) / torch.sqrt(var + eps)  # n x d


def barlow_loss(z1, z2, lambd):
    """Barlow Twins' loss over the global batch. z1, z2: n x d projections of this rank's two views.

    Normalisation (batch_normalize: biased variance, eps 1e-5 inside the sqrt, as BatchNorm in training) and
    cross-correlation use the statistics of all ranks, divided by the GLOBAL batch size N, so every rank
    returns the same value: the loss of the global batch. DDP averages the gradients of these equal losses,
    and the autograd-aware sums make that average the global batch's gradient."""
    n = len(z1)
    N = n * (dist.get_world_size() if dist.is_initialized() else 1)  # every rank holds n images (drop_last)
    z1, z2 = batch_normalize(z1.float(), N), batch_normalize(z2.float(), N)  # the loss in fp32: n x d each
    c = sum_over_ranks(z1.T @ z2, same_on_every_rank=True) / N  # d x d: cross-correlation of the global batch
    on_diag = (1 - c.diagonal()).pow(2).sum()  # invariance
    off_diag = off_diagonal(c).pow(2).sum()  # redundancy reduction
    return on_diag + lambd * off_diag


def off_diagonal(x):
    """The d x d matrix's off-diagonal elements, as a (d - 1) x d view (the official code's reshape: a boolean
    mask would make a GPU wait for the host to count its elements, and copy them)."""
    d = len(x)
    return x.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


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
    model = BarlowTwins(cfg).to(device)
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
            loss = cfg.loss_scale * barlow_loss(z1, z2, cfg.lambd)
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
