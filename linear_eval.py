"""Linear probe of a frozen backbone: the standard measure of a self-supervised representation.

The trunk f stays frozen in eval mode (BatchNorm uses its running statistics, no gradient reaches it); only
a linear classifier W f(x) + b on the pooled features is trained, with cross-entropy on the labelled train
split, for `epochs` epochs of SGD with momentum 0.9 (or LARS), no weight decay by default. The lr is given
per 256 images, like the pre-training scripts: the peak lr is lr x global_batch / 256, with global_batch =
batch_size x world_size, and it follows a per-step cosine from the peak down to 0 (no warm-up). Reported:
top-1 / top-5 on the val split, each val image counted exactly once (also under torchrun).

Two modes:
  cache_features false (default): the standard protocol. Each step crops and flips the train images
      (common/augment.py: linear_train_transform) and runs the frozen trunk on them; under torchrun every
      rank takes its own part of the data (DistributedSampler) and the head is wrapped in DDP.
  cache_features true: fast. The train features are extracted once, without augmentation (eval_transform),
      and gathered on every rank together with the val features; the head then trains on them alone. Under
      torchrun every rank draws the same random global batch and takes its disjoint share (rows rank, rank+W,
      ...), DDP averages the gradients: one global-batch step, identical weights on every rank.
Both modes drop the last incomplete global batch of each epoch.
  finetune true: the papers' fine-tuning protocol. The whole network trains (the trunk in train mode: BatchNorm
      with batch statistics), the trunk at its own lr (finetune_lr, per 256 images; 0: the head's), on augmented
      images in the run's precision (fp16 with a GradScaler); the trunk and head are saved next to the JSON
      (<out>.finetuned.pt: "backbone" and "head", the backbone loadable as a trunk by these scripts).

Input: as knn_eval.py, a method script's checkpoint or a plain trunk state_dict (with --arch, --image_size).
Output: the accuracies, printed and written as JSON (by default next to the checkpoint).
Preemption: SIGTERM / SIGUSR1 make every rank finish its step, save the probe's state (head, optimizer, step)
to <out>.state.pt and exit with status 75 (docs/reliability.md); the same command continues it exactly, from
that state or from the one saved at the end of every epoch (resume: auto), and removes it when done.

Run:
    python linear_eval.py --checkpoint runs/simclr/last.pt
    python linear_eval.py --checkpoint runs/simclr/last.pt --cache_features true --epochs 100
    torchrun --nproc_per_node=4 linear_eval.py --checkpoint runs/simclr/last.pt --batch_size 64
"""
import itertools
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common.augment import eval_transform, linear_train_transform
from common.checkpoints import load_backbone, load_checkpoint, load_state, save_checkpoint
from common.config import UsageError, parse_config, usage_errors
from common.data import (EpochSampler, SeededViews, Transformed, ignore_stop_signals, label_fraction_subset,
                         labelled_split, labels_of, subset)
from common.distributed import close_distributed, init_distributed, lost_rank_errors
from common.knn import extract_features, topk_correct
from common.precision import autocast, resolve_precision, to_device
from common.run_folder import RUN_ONLY_KEYS, changed_settings, write_json
from common.stopping import StopSignals


@dataclass
class Config:
    # input
    checkpoint: str = ""  # a method script's checkpoint (e.g. runs/simclr/last.pt) or a plain trunk state_dict
    arch: str = ""  # backbone override; required for a plain state_dict (empty = the checkpoint's)
    image_size: int = 0  # input resolution; required for a plain state_dict (0 = the checkpoint's)
    cifar_stem: str = ""  # auto | true | false (empty = the checkpoint's, or auto for a plain state_dict)
    patch_size: int = 0  # ViT patch size (0 = the checkpoint's, or 16)
    # data
    dataset: str = ""  # cifar10 | cifar100 | stl10 | folder | synthetic (empty = the checkpoint's)
    data_dir: str = ""  # dataset root (empty = the checkpoint's, else "data")
    download: bool = False  # let torchvision download cifar10 / cifar100 / stl10 into data_dir
    train_subset: int = 0  # train on a fixed random subset of this many train images (0 = all)
    label_fraction: int = 100  # % of the train labels used: 1 | 10 (ImageNet: SimCLR's official lists) | 100
    val_subset: int = 0  # evaluate on a fixed random subset of this many val images (0 = all)
    num_workers: int = 4  # data-loading processes per rank
    bad_images: str = "stop"  # an unreadable image file: stop (naming it) | skip (warn, use the next image)
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before the job stops
    cache_features: bool = False  # extract un-augmented features once and train on them (fast; fp16 on a GPU)
    finetune: bool = False  # train the whole network (BN in train mode), not a linear head on the frozen trunk
    finetune_lr: float = 0.0  # --finetune: the trunk's lr per 256 images (0: the head's lr)
    # optimisation
    epochs: int = 100  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "sgd"  # sgd | lars
    lr: float = 0.1  # per 256 images: the peak lr is lr x global_batch / 256, then a per-step cosine to 0
    momentum: float = 0.9  # SGD / LARS momentum
    weight_decay: float = 0.0  # on the head's weight (not its bias)
    precision: str = "auto"  # trunk: auto (bf16 where native, else fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0  # subsets, head init, data order and augmentations
    # output
    log_every: int = 50  # steps between the progress bar's readings of the loss (on a GPU each one waits for it)
    out: str = ""  # JSON file (empty = <checkpoint without extension>_linear_<dataset>.json)
    resume: str = "auto"  # auto: continue a probe stopped by SIGTERM / SIGUSR1 (its <out>.state.pt) | false
    stop_timeout: float = 120.0  # after SIGTERM / SIGUSR1: seconds to finish the step and save, else exit


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


def build_head_optimizer(cfg, head, trunk=None):
    """The head's optimizer (weight decay on its weight, not its bias); with a trunk to fine-tune, its weights and
    its biases and norm parameters in groups of their own, at finetune_lr / lr times the head's lr (lr_ratio)."""
    ratio = cfg.finetune_lr / cfg.lr if cfg.finetune_lr else 1.0
    groups = [{"params": [head.weight], "lr_ratio": 1.0}, {"params": [head.bias], "lr_ratio": 1.0, "weight_decay": 0.0}]
    if trunk is not None:
        params = [p for p in trunk.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim > 1], "lr_ratio": ratio},
                   {"params": [p for p in params if p.ndim == 1], "lr_ratio": ratio, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UsageError(f"optimizer must be sgd or lars, got {cfg.optimizer!r}")


def cache_dtype(device):
    """The cached features' type: fp16 on a GPU (half of fp32's memory; a ResNet's pooled features are far inside
    its range, and the head computes in fp32), fp32 on a CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def cached_batches(feats, labels, batch_size, rank, world_size, epoch, seed):
    """This rank's share of each full global batch of an epoch: the same permutation on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = to_device(torch.randperm(len(feats), generator=g), feats.device)
    global_batch = batch_size * world_size
    for start in range(0, len(feats) - global_batch + 1, global_batch):
        idx = order[start:start + global_batch][rank::world_size]
        yield feats[idx], labels[idx]


def save_probe(path, cfg, trained, optimizer, step, epoch_loss, is_main, train_loss=None):
    """On every rank: the probe's state after `step` (atomic; main rank): what it trains (`trained`: {"head": ...},
    with "trunk" and "scaler" when fine-tuning), the optimizer, the epoch's loss summed over ranks so far (and the
    last finished epoch's train_loss, which the JSON reports)."""
    if dist.is_initialized():
        epoch_loss = epoch_loss.clone()
        dist.all_reduce(epoch_loss)
    if is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_checkpoint({**{name: part.state_dict() for name, part in trained.items()},
                         "optimizer": optimizer.state_dict(), "step": step, "epoch_loss": epoch_loss.item(),
                         "train_loss": train_loss, "config": asdict(cfg)}, path)


def resume_probe(path, cfg, trained, optimizer, is_main):
    """(step, the epoch's loss so far summed over ranks, the last finished epoch's train_loss) of a stopped probe
    saved at `path`, loaded into head and optimizer; (0, 0.0, None) where there is none. Another probe's state
    (other settings) is an error; an unreadable one is named, and the probe starts over."""
    if not os.path.exists(path):
        return 0, 0.0, None
    try:
        state = load_checkpoint(path)
    except UsageError as e:  # cut short: the probe starts over (its cost, not a silent error)
        if is_main:
            print(f"warning: {e}; the probe starts over", file=sys.stderr, flush=True)
        return 0, 0.0, None
    differing = changed_settings(state["config"], cfg, ignore=(*RUN_ONLY_KEYS, "out"))
    if differing:
        raise UsageError(f"{path} holds a stopped probe with other settings ({'; '.join(differing)}); delete it to "
                         "start over, or pass --out elsewhere")
    for name, part in trained.items():
        load_state(part, state[name], path)
    load_state(optimizer, state["optimizer"], path)
    if is_main:
        print(f"resuming the probe from {path} at step {state['step']}", flush=True)
    return state["step"], state["epoch_loss"], state["train_loss"]


def main(cfg):
    if not cfg.checkpoint:
        raise UsageError("--checkpoint is required (a method script's last.pt or a plain trunk state_dict)")
    if min(cfg.epochs, cfg.batch_size, cfg.log_every) < 1 or cfg.dist_timeout <= 0 or cfg.stop_timeout <= 0:
        raise UsageError("--epochs, --batch_size, --log_every, --dist_timeout and --stop_timeout must be positive")
    if cfg.resume not in ("auto", "false"):
        raise UsageError(f"resume must be auto or false, got {cfg.resume!r}")
    if cfg.finetune and cfg.cache_features:
        raise UsageError("--finetune trains the trunk on augmented images; it cannot use --cache_features true")
    if cfg.finetune_lr < 0:
        raise UsageError(f"finetune_lr must not be negative, got {cfg.finetune_lr}")
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    is_main = rank == 0
    precision, why = resolve_precision(cfg.precision, device, is_main)
    backbone, width, args, trained = load_backbone(cfg.checkpoint, cfg.arch, cfg.image_size, cfg.cifar_stem,
                                                   cfg.patch_size)
    if cfg.finetune:  # trained whole: batch statistics in BN, a gradient everywhere
        backbone = backbone.to(device).train()
    else:  # frozen: running BN statistics, no grad
        backbone = backbone.to(device).eval().requires_grad_(False)
    dataset = cfg.dataset or trained.get("dataset")
    if not dataset:
        raise UsageError(f"{cfg.checkpoint} does not say which dataset it was trained on; pass --dataset")
    data_dir, size = cfg.data_dir or trained.get("data_dir", "data"), args["image_size"]

    # ---- data ----
    full = {split: labelled_split(dataset, data_dir, split, cfg.download, size, cfg.bad_images)
            for split in ("train", "val")}
    num_classes = max(labels_of(full["train"]) + labels_of(full["val"])) + 1
    labelled, label_subset, label_subset_sha1 = label_fraction_subset(full["train"], cfg.label_fraction, cfg.seed)
    train_images = subset(labelled, cfg.train_subset, cfg.seed)
    val_set = Transformed(subset(full["val"], cfg.val_subset, cfg.seed), eval_transform(size, dataset))
    global_batch = cfg.batch_size * world_size
    steps_per_epoch = len(train_images) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_images)} train images make no full batch of {cfg.batch_size} x "
                         f"{world_size} ranks; lower --batch_size")
    if cfg.cache_features:  # every rank holds them all; fp16 on a GPU: ImageNet's 1.28 M x 2048 take 5.2 GB
        cached = Transformed(train_images, eval_transform(size, dataset))
        train_feats, train_labels = extract_features(backbone, cached, cfg.batch_size, cfg.num_workers, device,
                                                     precision, rank, world_size, dtype=cache_dtype(device))
        if not torch.isfinite(train_feats).all():  # beyond fp16's range (65504): once more, in fp32
            if is_main:
                print("warning: the trunk's features exceed fp16's range; caching them in fp32", file=sys.stderr)
            train_feats, train_labels = extract_features(backbone, cached, cfg.batch_size, cfg.num_workers,
                                                         device, precision, rank, world_size)
    else:
        train_set = SeededViews(train_images, linear_train_transform(size, dataset), seed=cfg.seed)
        sampler = EpochSampler(DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed,
                                                  drop_last=True))
        loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                            drop_last=True, worker_init_fn=ignore_stop_signals)

    # ---- head and optimiser ----
    torch.manual_seed(cfg.seed)
    head = nn.Linear(width, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    optimizer = build_head_optimizer(cfg, head, backbone if cfg.finetune else None)
    net = nn.Sequential(backbone, head) if cfg.finetune else head  # what trains, and what DDP wraps
    ddp_net = DDP(net) if world_size > 1 else net
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.finetune and precision == "fp16")
    trained = {"head": head, **({"trunk": backbone, "scaler": scaler} if cfg.finetune else {})}
    peak_lr, total_steps = cfg.lr * global_batch / 256, cfg.epochs * steps_per_epoch

    # ---- resume: a probe stopped by a signal continues where it was ----
    out = cfg.out or f"{os.path.splitext(cfg.checkpoint)[0]}_linear_{dataset}.json"
    state_path = f"{os.path.splitext(out)[0]}.state.pt"
    signals = StopSignals(cfg.stop_timeout, rank, world_size, cfg.dist_timeout)
    step, loss_so_far, train_loss = (resume_probe(state_path, cfg, trained, optimizer, is_main)
                                     if cfg.resume == "auto" else (0, 0.0, None))

    # ---- training ----
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        done = step - epoch * steps_per_epoch  # steps of this epoch before a resume
        if cfg.cache_features:
            batches = itertools.islice(cached_batches(train_feats, train_labels, cfg.batch_size, rank, world_size,
                                                      epoch, cfg.seed), done, None)
        else:
            sampler.set_epoch(epoch, skip=done * cfg.batch_size)
            batches = loader
        bar = tqdm(batches, total=steps_per_epoch - done, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not is_main, dynamic_ncols=True)
        epoch_loss = torch.full((), loss_so_far if is_main and done else 0.0, device=device)  # summed over ranks
        for x, y in bar:
            lr = 0.5 * peak_lr * (1 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.finetune:
                with autocast(device, precision):
                    logits = ddp_net(x)
            else:
                if not cfg.cache_features:
                    with torch.no_grad(), autocast(device, precision):
                        x = backbone(x)
                logits = ddp_net(x.float())
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            epoch_loss += loss.detach()
            if step % cfg.log_every == 0:  # the loss read on the host: the only wait between these steps
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}")
            if signals.agree()[0] and step % steps_per_epoch:  # the epoch's last step: saved just below
                save_probe(state_path, cfg, trained, optimizer, step, epoch_loss, is_main)
                signals.exit_after_checkpoint(f"{state_path} at step {step}", is_main)
        if world_size > 1:
            dist.all_reduce(epoch_loss)
        train_loss = epoch_loss.item() / (steps_per_epoch * world_size)
        if is_main:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}")
        save_probe(state_path, cfg, trained, optimizer, step, epoch_loss.new_zeros(()), is_main, train_loss)
        if signals.agree()[0]:
            signals.exit_after_checkpoint(f"{state_path} at step {step}", is_main)

    # ---- evaluation: every val image once (extract_features shards without padding and gathers) ----
    val_feats, val_labels = extract_features(backbone, val_set, cfg.batch_size, cfg.num_workers, device,
                                             precision, rank, world_size)
    with torch.no_grad():
        top1, top5 = topk_correct(head(val_feats), val_labels)
    top1, top5 = 100.0 * top1 / len(val_set), 100.0 * top5 / len(val_set)

    if is_main:
        mode = "cached features" if cfg.cache_features else "augmented images"
        what = "fine-tuning" if cfg.finetune else "linear probe"
        print(f"{what} ({cfg.epochs} epochs on {mode}, {cfg.optimizer} lr {peak_lr:.3g}) on {dataset}: "
              f"top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({len(train_images)} train, {len(val_set)} val "
              f"images) -> {out}")
        write_json({"top1": top1, "top5": top5, "epochs": cfg.epochs, "lr": cfg.lr, "peak_lr": peak_lr,
                    "optimizer": cfg.optimizer, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                    "batch_size": cfg.batch_size, "global_batch": global_batch, "world_size": world_size,
                    "cache_features": cfg.cache_features, "finetune": cfg.finetune,
                    "finetune_lr": cfg.finetune_lr or cfg.lr, "train_loss": train_loss, "dataset": dataset,
                    "checkpoint": cfg.checkpoint, "num_train": len(train_images), "num_val": len(val_set),
                    "num_classes": num_classes, "data_dir": data_dir, "backbone_args": args,
                    "label_fraction": cfg.label_fraction, "label_subset": label_subset,
                    "label_subset_sha1": label_subset_sha1,
                    "precision": precision, "precision_reason": why, "seed": cfg.seed}, out)
        if cfg.finetune:  # the fine-tuned network: its trunk loads as a trunk of these scripts (knn_eval.py, ...)
            save_checkpoint({"backbone": backbone.state_dict(), "backbone_args": args, "head": head.state_dict(),
                             "method": "finetuned"}, f"{os.path.splitext(out)[0]}.finetuned.pt")
        os.remove(state_path)  # done: nothing to resume
    close_distributed()


if __name__ == "__main__":
    with usage_errors(), lost_rank_errors():
        main(parse_config(Config))
