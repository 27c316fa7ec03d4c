"""SimSiam: "Exploring Simple Siamese Representation Learning".
Xinlei Chen, Kaiming He. CVPR 2021. arXiv:2011.10566.

Each image x gives two random views. One encoder f (backbone + projector) maps them to z1, z2, and a predictor
h (an MLP with a bottleneck) maps those to p1 = h(z1), p2 = h(z2). With D(p, z) = -cos(p, z), the loss is

    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)),   D(p, z) = -(p / ||p||_2) . (z / ||z||_2),

averaged over the batch. No negatives, no momentum encoder, no large batch: the stop-gradient alone keeps
the outputs from collapsing to a constant (the paper's Fig. 2), which train/z_std watches. After training,
projector and predictor are dropped and the backbone is the representation that knn_eval.py and
linear_eval.py measure.

The paper's pseudo-code (Algorithm 1), mapped onto this file:
    f = backbone + projector, h = predictor              SimSiam.__init__
    z1, z2 = f(x1), f(x2); p1, p2 = h(z1), h(z2)         SimSiam.forward
    L = D(p1, z2)/2 + D(p2, z1)/2, z.detach() in D       simsiam_loss (the stop-gradient is its first line)
    L.backward(); update(f, h)                           the loop: SGD, the predictor's lr fixed (set_lr)

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python simsiam.py --config configs/simsiam.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 simsiam.py --config configs/simsiam.yaml
    python knn_eval.py --checkpoint runs/simsiam/last.pt --dataset cifar10 --data_dir data
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common.augment import eval_transform, two_views
from common.backbones import backbone_args, build_backbone
from common.config import UsageError, parse_config, usage_errors
from common.data import EpochSampler, SeededViews, Transformed, build_dataset, subset
from common.knn import knn_accuracy
from common.runtime import (MetricLog, autocast, changed_settings, init_distributed, load_checkpoint,
                            load_state, prepare_run_folder, rng_states, save_checkpoint, set_rng_states)


@dataclass
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "data"  # dataset root (folder: an ImageFolder tree with train/ and val/)
    download: bool = False  # let torchvision download cifar10 / cifar100 / stl10 into data_dir
    subset: int = 0  # pre-train on a fixed random subset of this many images (0 = all)
    image_size: int = 32  # side of the random crops
    augment: str = "sym_weak"  # view preset (common/augment.py): sym | sym_weak | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    num_workers: int = 4  # data-loading processes per rank
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 3  # projector (part of f): Linear layers, BN after each, ReLU after all but the last
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 2048  # width of z and p
    pred_hidden_dim: int = 512  # predictor h's bottleneck: proj_dim -> pred_hidden_dim -> proj_dim
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "sgd"  # sgd | lars
    lr: float = 0.5  # per 256 images: the peak lr is lr x global_batch / 256 (the predictor's lr, fixed)
    min_lr: float = 0.0  # lr at the end of the cosine (backbone and projector)
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr (backbone and projector)
    weight_decay: float = 1e-5  # not applied to biases and norm parameters
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    precision: str = "bf16"  # bf16 | fp16 (GPU only, with a GradScaler) | fp32
    channels_last: bool = True  # NHWC memory format (faster convolutions with mixed precision)
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model init, data order and augmentations
    # run
    out_dir: str = "runs/simsiam"  # run folder: config.json, metrics.jsonl, last.pt, epoch_XXXX.pt
    resume: bool = False  # continue the run in out_dir from its last.pt
    snapshot_every: int = 100  # also keep epoch_XXXX.pt every this many epochs (last.pt: every epoch)
    log_every: int = 10  # steps between lines of metrics.jsonl
    knn_every: int = 0  # epochs between online kNN checks on the labelled train/val splits (0 = off)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_temperature: float = 0.07  # vote temperature of the kNN monitor
    collapse_warn: float = 0.1  # warn when an epoch's train/z_std < this x 1/sqrt(proj_dim), its healthy value


# ---- model ----
def projection_mlp(width, hidden_dim, out_dim, layers):
    """The paper's projector: `layers` Linear layers with BN on each, ReLU on all but the output. The Linear
    layers have no bias (BN follows each) and the output BN no affine parameters, as in the official code."""
    if layers < 1:
        raise UsageError(f"proj_layers must be at least 1, got {layers}")
    dims = [width] + [hidden_dim] * (layers - 1) + [out_dim]
    blocks = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        blocks += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*blocks, nn.Linear(dims[-2], out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


class SimSiam(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f = backbone + projector
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        self.projector = projection_mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.predictor = nn.Sequential(  # h: a bottleneck, BN on its hidden layer only
            nn.Linear(cfg.proj_dim, cfg.pred_hidden_dim, bias=False), nn.BatchNorm1d(cfg.pred_hidden_dim),
            nn.ReLU(inplace=True), nn.Linear(cfg.pred_hidden_dim, cfg.proj_dim))

    def forward(self, x1, x2):
        # one pass per view, as in the paper's code: BN statistics are those of one view
        z1 = self.projector(self.backbone(x1))  # n x proj_dim
        z2 = self.projector(self.backbone(x2))  # n x proj_dim
        p1, p2 = self.predictor(z1), self.predictor(z2)  # n x proj_dim each
        return p1, p2, z1, z2  # the stop-gradient on z is in simsiam_loss, as in the paper's D()


# ---- loss and cross-rank operations ----
def simsiam_loss(p1, p2, z1, z2):
    """L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 with D(p, z) = -cos(p, z), the mean over this
    rank's n images. p1, p2: n x d predictions, z1, z2: n x d projections of the two views.

    No cross-rank operation: each image's term involves only its own p and z, so the mean over ranks of the
    per-rank means is the loss of the global batch, and DDP's gradient averaging turns it into its gradient."""
    z1, z2 = z1.detach(), z2.detach()  # stop-gradient: z is a constant target, only p carries the gradient
    p1, p2, z1, z2 = p1.float(), p2.float(), z1.float(), z2.float()  # fp32 loss math
    return -(F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean()) / 2


@torch.no_grad()
def collapse_std(z):
    """The paper's collapse monitor (Sec. 4.1, Fig. 2): the std over the batch of each channel of z / ||z||_2,
    averaged over channels. About 1/sqrt(d) when z spreads over the unit sphere of R^d (and never much more),
    0 when every output is the same vector. z: n x d; returns a 0-d tensor."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# ---- optimizer and schedules ----
class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017, arXiv:1708.03888) as used by SimCLR, BYOL and Barlow Twins.

    For each weight matrix: d = grad + weight_decay * w, trust ratio q = eta * ||w|| / ||d||, then SGD with
    momentum on q * d. Parameters with ndim == 1 (biases, BN and LayerNorm weights) get neither weight decay
    nor adaptation: plain SGD with momentum. With clip=True the adapted step is capped at the scheduled lr
    (q <- min(q / lr, 1)), as in apex's LARC "clip" mode and solo-learn. Differences from the others:
    SimCLR-TF's LARS selects the excluded variables by name and uses eta 0.001 without clipping; apex LARC
    computes the trust ratio as eta * ||w|| / (||g|| + wd * ||w||) rather than from ||g + wd * w||."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    q = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    if group["clip"]:
                        q = (q / group["lr"]).clamp(max=1.0) if group["lr"] > 0 else torch.ones_like(q)
                    d = d.mul(q)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(cfg, model):
    # the predictor's groups carry fix_lr: set_lr keeps their lr at the peak (the paper's "fix lr of h")
    predictor = {id(p) for p in model.predictor.parameters()}
    parts = [([p for p in model.parameters() if id(p) not in predictor], False),
             (list(model.predictor.parameters()), True)]
    if cfg.optimizer == "lars":
        groups = [{"params": params, "fix_lr": fix_lr} for params, fix_lr in parts]
        return LARS(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    eta=cfg.lars_eta, clip=cfg.lars_clip)
    if cfg.optimizer == "sgd":
        groups = [group for params, fix_lr in parts for group in (
            {"params": [p for p in params if p.ndim > 1], "fix_lr": fix_lr},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0, "fix_lr": fix_lr})]
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UsageError(f"optimizer must be lars or sgd, got {cfg.optimizer!r}")


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Linear warm-up from 0 to peak_lr over warmup_steps, then a cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr, fixed_lr):
    """The scheduled lr on every group, except the predictor's (fix_lr): they stay at fixed_lr, the peak lr,
    through warm-up and decay alike (the official code's fix_lr, solo-learn's static_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = fixed_lr if group["fix_lr"] else lr


def mean_over_ranks(x):
    """No grad (logging only): the average of a detached scalar over ranks, as a float."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


# ---- training ----
def train(cfg):
    rank, world_size, device = init_distributed()
    is_main = rank == 0
    global_batch = cfg.batch_size * world_size
    torch.manual_seed(cfg.seed)

    # ---- data ----
    views = two_views(cfg.augment, cfg.image_size, cfg.dataset, scale=(cfg.crop_min_scale, 1.0))
    images = subset(build_dataset(cfg.dataset, cfg.data_dir, "pretrain", cfg.download, cfg.image_size),
                    cfg.subset, cfg.seed)
    train_set = SeededViews(images, views, seed=cfg.seed)
    sampler = EpochSampler(DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed,
                                              drop_last=True))
    loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_set)} images make no full batch of {cfg.batch_size} x {world_size} "
                         "ranks; lower --batch_size")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.lr * global_batch / 256
    healthy_z_std = 1 / math.sqrt(cfg.proj_dim)  # collapse_std of outputs spread over the sphere

    # ---- model ----
    model = SimSiam(cfg).to(device)
    if world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    precision = autocast(device, cfg.precision)

    # ---- run folder and resume ----
    last = prepare_run_folder(cfg, cfg.resume, is_main, world_size=world_size, global_batch=global_batch,
                              peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    step, start_epoch = 0, 0
    if cfg.resume:
        ckpt = load_checkpoint(last)
        load_state(model, ckpt["model"], last)
        load_state(optimizer, ckpt["optimizer"], last)
        load_state(scaler, ckpt["scaler"], last)
        step, start_epoch = ckpt["step"], ckpt["epoch"]
        set_rng_states(ckpt["rng"])
        changed = changed_settings(ckpt["config"], cfg)  # e.g. a longer --epochs reshapes the schedule
        if is_main and changed:
            tqdm.write(f"resuming with changed settings: {'; '.join(changed)}")
    ddp_model = DDP(model) if world_size > 1 else model
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    log = MetricLog(cfg.out_dir, is_main)
    knn_sets = None

    # ---- loop ----
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True)
        epoch_loss, epoch_z_std, tic = 0.0, 0.0, time.time()
        for (x1, x2), _ in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            set_lr(optimizer, lr, fixed_lr=peak_lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            with precision:
                p1, p2, z1, z2 = ddp_model(x1, x2)
            loss = simsiam_loss(p1, p2, z1, z2)
            loss_value = mean_over_ranks(loss.detach())
            if not math.isfinite(loss_value):
                raise SystemExit(f"error: loss is {loss_value} at step {step} (epoch {epoch + 1}); stopped "
                                 f"before the update, {last} is untouched. Lower --lr, lengthen "
                                 "--warmup_epochs or try --precision fp32, then --resume.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            epoch_loss += loss_value
            epoch_z_std += (collapse_std(z1) + collapse_std(z2)) / 2
            images_per_s = global_batch * (bar.n + 1) / max(time.time() - tic, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
            if step % cfg.log_every == 0:
                log.write(step=step, epoch=epoch + 1, **{"train/loss": loss_value, "train/lr": lr})
        z_std = mean_over_ranks(epoch_z_std / steps_per_epoch)
        log.write(step=step, epoch=epoch + 1, **{"train/epoch_loss": epoch_loss / steps_per_epoch,
                                                 "train/images_per_s": global_batch * steps_per_epoch
                                                 / (time.time() - tic),
                                                 "train/z_std": z_std, "train/z_std_healthy": healthy_z_std})
        if is_main and z_std < cfg.collapse_warn * healthy_z_std:
            tqdm.write(f"warning: epoch {epoch + 1}: train/z_std {z_std:.5f} is below {cfg.collapse_warn} x "
                       f"1/sqrt({cfg.proj_dim}) = {cfg.collapse_warn * healthy_z_std:.5f}: the outputs are "
                       "collapsing to a constant (the paper's Fig. 2). Check the stop-gradient and the "
                       "predictor, or lower --lr.", file=sys.stderr)

        if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
            if knn_sets is None:
                knn_sets = [Transformed(build_dataset(cfg.dataset, cfg.data_dir, split, image_size=cfg.image_size),
                                        eval_transform(cfg.image_size, cfg.dataset)) for split in ("train", "val")]
            top1, top5 = knn_accuracy(model.backbone, *knn_sets, cfg.knn_k, cfg.knn_temperature, 2 * cfg.batch_size,
                                      cfg.num_workers, device, precision, rank, world_size)
            log.write(step=step, epoch=epoch + 1, **{"eval/knn_top1": top1, "eval/knn_top5": top5})
            if is_main:
                tqdm.write(f"epoch {epoch + 1}: kNN top-1 {top1:.2f}%  top-5 {top5:.2f}%")

        if is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch + 1, "config": asdict(cfg),
                     "rng": rng_states(), "backbone": model.backbone.state_dict(),
                     "backbone_args": model.backbone_args}
            save_checkpoint(state, last)
            if (epoch + 1) % cfg.snapshot_every == 0 or epoch + 1 == cfg.epochs:
                save_checkpoint(state, os.path.join(cfg.out_dir, f"epoch_{epoch + 1:04d}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    with usage_errors():
        train(parse_config(Config))
