"""NNCLR: "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations".
Debidatta Dwibedi, Yusuf Aytar, Jonathan Tompson, Pierre Sermanet, Andrew Zisserman. ICCV 2021. arXiv:2104.14548.

SimCLR with a friend as the positive: each view's projection z is replaced by its nearest neighbour NN(z) in a
support set Q of projections from earlier steps, and NN(z) must pick out the prediction p+ = g(z+) of the image's
other view among the predictions of the GLOBAL batch (gathered from every rank with their gradient):

    L_i = -log( exp(NN(z_i) . p+_i / tau) / sum_k exp(NN(z_i) . p+_k / tau) ),   all vectors L2-normalised,
    loss = (L(NN(z1), p2) + L(NN(z2), p1)) / 2

(the paper's Eq. 2 with the prediction p+ in place of z+ and both directions averaged, as its Algorithm 1).

NN(z) = argmax_{q in Q} cos(z, q) is looked up without gradient (Q holds constants), so the loss trains the
predictor g and, through p = g(z), the projector and the backbone. After the loss, the projections z1 of view 1 of
the whole global batch (all ranks, in rank order) replace the oldest rows of Q: one view, as the paper's
pseudo-code (update_queue(Q, z1)) and solo-learn. Q (queue_size rows, a multiple of the global batch) starts as
random unit vectors drawn from the seed, as in solo-learn. There is no official code: this follows the paper's
pseudo-code and, for CIFAR, solo-learn. A step skipped for a non-finite loss (--skip_nonfinite) enqueues nothing.
train/nn_acc (solo-learn's monitor) is the fraction of view-1 queries whose nearest neighbour has the query's
class, from the labels Q keeps beside its rows (queue_labels) and uses for nothing else: 0 at the start (the
random rows have no class), it should climb well above chance (1 / classes) as the representation groups classes.

The paper's Algorithm 1 in this file:
    z1, z2 = f(aug(x)), f(aug(x))              NNCLR.forward: backbone and projector, one pass per view
    p1, p2 = g(z1), g(z2)                      NNCLR.forward: the predictor
    NN1, NN2 = NN(z1, Q), NN(z2, Q)            nearest_neighbour under torch.no_grad()
    loss = L(NN1, p2) / 2 + L(NN2, p1) / 2     nnclr_loss: p gathered from every rank, labels offset by rank
    update(f, g)                               LARS / SGD step in train()
    update_queue(Q, z1)                        enqueue: the z1 of all ranks overwrite the oldest rows of Q
After training, only the backbone is kept ("backbone" in the checkpoint): the representation that knn_eval.py
and linear_eval.py measure.

Run (batch_size is per rank; lr is per 256 images and scaled by the global batch):
    python nnclr.py --config configs/nnclr.yaml --data_dir data --download true
    torchrun --nproc_per_node=4 nnclr.py --config configs/nnclr.yaml --batch_size 64
    torchrun --nproc_per_node=8 nnclr.py --config configs/nnclr_imagenet.yaml --data_dir /path/to/imagenet
    python knn_eval.py --checkpoint runs/nnclr/last.pt --dataset cifar10 --data_dir data
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
    """NNCLR's method and recipe; the data and run settings every script shares are in PretrainConfig."""
    # views
    image_size: int = 32  # side of the random crops
    augment: str = "asym"  # view preset (common/augment.py): sym | sym_weak | moco_v1 | asym
    crop_min_scale: float = 0.08  # smallest area fraction of RandomResizedCrop
    # model
    arch: str = "resnet18"  # backbone (common/backbones.py)
    cifar_stem: str = "auto"  # 3x3 stride-1 first conv, no max-pool: auto (on at <= 64 px) | true | false
    patch_size: int = 16  # ViT patch size
    zero_init_residual: bool = False  # ResNets: start each residual block as the identity (last BN gamma = 0)
    proj_layers: int = 3  # Linear layers of the projector: (proj_layers - 1) x Linear-BN-ReLU, then Linear-BN
    proj_hidden_dim: int = 2048  # width of the projector's hidden layers
    proj_dim: int = 256  # width of z and p
    pred_hidden_dim: int = 4096  # width of the predictor g's hidden layer: Linear-BN-ReLU-Linear
    queue_size: int = 65536  # rows of the support set Q, projections of earlier steps (a multiple of the global batch)
    temperature: float = 0.2  # tau of the contrastive loss
    # optimisation
    epochs: int = 1000  # training length
    batch_size: int = 256  # images per rank; global_batch = batch_size x world_size
    optimizer: str = "lars"  # lars | sgd | adamw (AdamW: torch's betas (0.9, 0.999), as MoCo v3 and DINO)
    lr: float = 0.4  # per 256 images: the peak lr is lr x global_batch / 256
    min_lr: float = 0.0  # lr at the end of the cosine
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    bias_lr_ratio: float = 1.0  # lr of biases and norm parameters = this x the scheduled lr
    weight_decay: float = 1e-5  # on weights; biases and norm parameters: see decay_bias_and_norm
    decay_bias_and_norm: bool = False  # weight decay on biases and norm parameters too (LARS: also adapted, as LARC)
    momentum: float = 0.9  # SGD / LARS momentum
    lars_eta: float = 0.02  # LARS trust coefficient
    lars_clip: bool = True  # LARC-style clipping: the adapted lr never exceeds the scheduled lr
    out_dir: str = "runs/nnclr"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)


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


class NNCLR(nn.Module):
    """The backbone and projector (the paper's f), the predictor g and the support set Q in one module. Q is two
    buffers, so that state_dict(), checkpoints and resume hold it: `queue` (queue_size x proj_dim unit vectors) and
    `queue_labels` (their classes, -1 for none, read by the train/nn_acc monitor only). The rows a step writes
    follow from the step (enqueue), so there is no pointer to store."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone_args = backbone_args(cfg.arch, cfg.image_size, cfg.cifar_stem, cfg.patch_size)
        # f: the backbone and the projector, BN after every Linear and ReLU after all but the last (the paper's);
        # g: the predictor, BN and ReLU on its hidden layer only
        self.backbone, width = build_backbone(**self.backbone_args, zero_init_residual=cfg.zero_init_residual)
        self.projector = mlp(width, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bn="affine")
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        # Q: random unit vectors (from the seed) until the first queue_size / global_batch steps replace them
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_labels", torch.full((cfg.queue_size,), -1))

    def forward(self, x1, x2):
        # one pass per view, as in the paper's pseudo-code: BN statistics are those of one view's n images
        z1 = self.projector(self.backbone(x1))  # n x proj_dim
        z2 = self.projector(self.backbone(x2))  # n x proj_dim
        return z1, z2, self.predictor(z1), self.predictor(z2)  # z1, z2, p1, p2


def check_nnclr(cfg, world_size):
    """Each step's projections of all ranks replace whole rows of Q (enqueue): checked before anything is loaded
    or written."""
    global_batch = cfg.batch_size * world_size
    if cfg.queue_size <= 0 or cfg.queue_size % global_batch:
        raise UsageError(f"queue_size {cfg.queue_size} must be a positive multiple of the global batch "
                         f"{global_batch} ({cfg.batch_size} x {world_size} ranks), so that each step's projections "
                         f"replace whole rows of the support set; e.g. --queue_size "
                         f"{max(1, cfg.queue_size // global_batch) * global_batch}")


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
def nearest_neighbour(z, queue):
    """NN(z): for each row of z (n x d), the row of the support set queue (K x d unit vectors) with the highest
    cosine similarity, and its index; no gradient (the support set is a constant)."""
    index = (F.normalize(z.float(), dim=1) @ queue.T).argmax(dim=1)  # n
    return queue[index], index  # n x d, n


def nnclr_loss(p1, p2, nn1, nn2, temperature):
    """(L(nn1, p2) + L(nn2, p1)) / 2 over the global batch. p1, p2: n x d predictions of this rank's two views;
    nn1, nn2: n x d nearest neighbours of their projections. Each nearest neighbour must pick out the other view's
    prediction among the N of the global batch (gathered with gradient). Returns the mean over this rank's n."""
    n = len(p1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    p1, p2 = F.normalize(p1.float(), dim=1), F.normalize(p2.float(), dim=1)  # the loss in fp32
    nn1, nn2 = F.normalize(nn1.float(), dim=1), F.normalize(nn2.float(), dim=1)
    labels = torch.arange(n, device=p1.device) + n * rank  # global index of this rank's images
    loss_1 = F.cross_entropy(nn1 @ gather_with_grad(p2).T / temperature, labels)  # n x N logits
    loss_2 = F.cross_entropy(nn2 @ gather_with_grad(p1).T / temperature, labels)
    return (loss_1 + loss_2) / 2


@torch.no_grad()
def enqueue(queue, keys, step):
    """This step's vectors (keys: n x d on each rank) of all ranks, in rank order, overwrite the oldest rows of
    queue (K x d), so the queue is the same on every rank. Step s writes rows [s N, (s + 1) N) mod K: no pointer
    to store, and resume is exact."""
    keys = F.normalize(gather_no_grad(keys).float(), dim=1)  # N x d, no grad (targets only)
    start = step * len(keys) % len(queue)
    queue[start:start + len(keys)] = keys


@torch.no_grad()
def enqueue_labels(queue_labels, labels, step):
    """The classes of the rows that enqueue(queue, keys, step) wrote: this step's labels (n on each rank) of all
    ranks, in rank order, at rows [s N, (s + 1) N) mod K."""
    labels = gather_no_grad(labels)  # N, no grad (targets only)
    start = step * len(labels) % len(queue_labels)
    queue_labels[start:start + len(labels)] = labels


@torch.no_grad()
def nn_accuracy(nn_labels, labels):
    """train/nn_acc: the fraction of this rank's labelled queries (label >= 0) whose nearest neighbour in the
    support set has their class (nn_labels: the neighbours' queue_labels); NaN where none is labelled."""
    known = labels >= 0
    return ((nn_labels == labels) & known).sum() / known.sum()


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
    check_nnclr(cfg, world_size)
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
    model = NNCLR(cfg).to(device)
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
            set_lr(optimizer, lr, peak_lr)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)  # for the nn_acc monitor only
            with autocast(device, precision):
                z1, z2, p1, p2 = ddp_model(x1, x2)
            (nn1, index1), (nn2, _) = nearest_neighbour(z1, model.queue), nearest_neighbour(z2, model.queue)
            loss = nnclr_loss(p1, p2, nn1, nn2, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradient (fp16), for its norm
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            nn_acc = nn_accuracy(model.queue_labels[index1], labels)
            probe_stats = probe.step(labels, lr_at(step, total_steps, warmup_steps, cfg.probe_lr))  # {} if none
            # kept on the device; False only for a non-finite step to skip (--skip_nonfinite)
            if metrics.add(loss=loss, grad_norm=grad_norm, nn_acc=nn_acc, **probe_stats):
                scaler.step(optimizer)
                enqueue(model.queue, z1, step)  # after the loss: view 1's projections of all ranks replace Q's oldest
                enqueue_labels(model.queue_labels, labels, step)  # and their classes, for nn_acc
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
