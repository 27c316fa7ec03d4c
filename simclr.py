"""SimCLR: "A Simple Framework for Contrastive Learning of Visual Representations".
Ting Chen, Simon Kornblith, Mohammad Norouzi, Geoffrey Hinton. ICML 2020. arXiv:2002.05709.

Each image x gives two random views; the encoder f (backbone) and projector g map them to z = g(f(view)).
Over the 2N projections of a GLOBAL batch of N images (negatives come from every rank), the NT-Xent loss
of the positive pair (i, j) is

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),  sim = cosine,

averaged over all 2N anchors (Algorithm 1 of the paper). After training, g is dropped and f(x) is the
representation that knn_eval.py and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python simclr.py --config configs/simclr.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 simclr.py --config configs/simclr.yaml
    python knn_eval.py --checkpoint runs/simclr/last.pt --dataset cifar10 --data_dir data
"""
import math
import os
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
    augment: str = "sym"  # view preset (common/augment.py): sym | sym_weak | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    num_workers: int = 4  # data-loading processes per rank
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_hidden_dim: int = 2048  # projector g: Linear-BN-ReLU-Linear
    proj_dim: int = 256  # width of z
    temperature: float = 0.2  # tau of NT-Xent
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd
    lr: float = 0.4  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    weight_decay: float = 1e-4  # not applied to biases and norm parameters
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    precision: str = "bf16"  # bf16 | fp16 (GPU only, with a GradScaler) | fp32
    channels_last: bool = True  # NHWC memory format (faster convolutions with mixed precision)
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model init, data order and augmentations
    # run
    out_dir: str = "runs/simclr"  # run folder: config.json, metrics.jsonl, last.pt, epoch_XXXX.pt
    resume: bool = False  # continue the run in out_dir from its last.pt
    snapshot_every: int = 100  # also keep epoch_XXXX.pt every this many epochs (last.pt: every epoch)
    log_every: int = 10  # steps between lines of metrics.jsonl
    knn_every: int = 0  # epochs between online kNN checks on the labelled train/val splits (0 = off)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_temperature: float = 0.07  # vote temperature of the kNN monitor


# ---- model ----
class SimCLR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)  # f
        self.projector = nn.Sequential(  # g
            nn.Linear(width, cfg.proj_hidden_dim), nn.BatchNorm1d(cfg.proj_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden_dim, cfg.proj_dim))

    def forward(self, x1, x2):
        # both views in one pass, as in the paper's code: BN statistics cover all 2n images
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # 2n x proj_dim
        return z.chunk(2)  # z1, z2: n x proj_dim each


# ---- loss and cross-rank operations ----
class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0, autograd-aware: the backward sums the gradients that every rank computed for
    the gathered tensor and returns this rank's slice, so negatives on other ranks train this rank's z."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
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
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # fp32 softmax at small tau
    anchors = torch.cat([z1, z2])  # 2n x d
    candidates = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # 2N x d: views 1, then views 2
    N = candidates.shape[0] // 2
    logits = anchors @ candidates.T / temperature  # 2n x 2N
    idx = torch.arange(n, device=z1.device) + n * rank  # global index of this rank's images
    self_column = torch.cat([idx, idx + N])  # k != i: an anchor is not its own negative
    positive = torch.cat([idx + N, idx])  # view 1 of image i pairs with view 2 of image i, and back
    logits[torch.arange(2 * n, device=z1.device), self_column] = float("-inf")
    return F.cross_entropy(logits, positive)


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
    if cfg.optimizer == "lars":
        return LARS(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    eta=cfg.lars_eta, clip=cfg.lars_clip)
    if cfg.optimizer == "sgd":
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UsageError(f"optimizer must be lars or sgd, got {cfg.optimizer!r}")


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Linear warm-up from 0 to peak_lr over warmup_steps, then a cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


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

    # ---- model ----
    model = SimCLR(cfg).to(device)
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
        epoch_loss, tic = 0.0, time.time()
        for (x1, x2), _ in bar:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            with precision:
                z1, z2 = ddp_model(x1, x2)
            loss = simclr_loss(z1, z2, cfg.temperature)
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
            images_per_s = global_batch * (bar.n + 1) / max(time.time() - tic, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
            if step % cfg.log_every == 0:
                log.write(step=step, epoch=epoch + 1, **{"train/loss": loss_value, "train/lr": lr})
        log.write(step=step, epoch=epoch + 1, **{"train/epoch_loss": epoch_loss / steps_per_epoch,
                                                 "train/images_per_s": global_batch * steps_per_epoch
                                                 / (time.time() - tic)})

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
