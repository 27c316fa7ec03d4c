"""Weighted kNN classification on frozen features (InstDisc / DINO protocol), feature extraction that shards a
data set over ranks, and the online kNN monitor of the pre-training scripts.

Under torchrun the bank stays sharded: rank r embeds and keeps bank items r, r + W, r + 2W, ..., every rank
holds all the queries, and the k nearest neighbours of each rank's shard are gathered and merged. Features are
normalised and stored batch by batch, in fp16 on GPUs: a ResNet-50 bank of ImageNet (1.28 M x 2048) takes
0.66 GB per GPU on 8 GPUs (twice that for a moment, while the batches are concatenated) instead of 10.5 GB in
fp32 on every GPU, so the monitor fits beside training.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common.augment import eval_transform
from common.config import UsageError
from common.data import Transformed, ignore_stop_signals, labelled_split
from common.precision import autocast


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, num_workers, device, precision, rank=0, world_size=1,
                     gather=True, normalize=False, dtype=torch.float32):
    """Features and labels of the dataset, stored in `dtype` (L2-normalised first with normalize=True), batch
    by batch. Rank r embeds items r, r+W, r+2W, ... (no padding, so nothing is counted twice); with gather=True
    the shards are gathered on every rank and put back in dataset order, with gather=False each rank returns
    its own shard."""
    if len(dataset) < world_size:
        raise UsageError(f"{len(dataset)} images cannot be shared by {world_size} ranks; evaluate on more images")
    was_training = backbone.training
    backbone.eval()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    # its own generator: iterating a DataLoader draws a seed, which would move the training's random stream
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    feats, labels = [], []
    for images, y in loader:
        with autocast(device, precision):
            f = backbone(images.to(device, non_blocking=True)).float()
        feats.append((F.normalize(f, dim=1) if normalize else f).to(dtype))
        labels.append(y.to(device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world_size == 1 or not gather:
        return feats, labels
    # gather shards of unequal size (they differ by at most one): pad to the longest, then interleave
    longest = (len(dataset) + world_size - 1) // world_size
    pad = longest - len(feats)
    feats = F.pad(feats, (0, 0, 0, pad))
    labels = F.pad(labels, (0, pad), value=-2)
    all_feats = [torch.empty_like(feats) for _ in range(world_size)]
    all_labels = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(all_feats, feats)
    dist.all_gather(all_labels, labels)
    order = torch.stack(all_feats, 1).flatten(0, 1)[: len(dataset)]  # item i = shard i % W, row i // W
    return order, torch.stack(all_labels, 1).flatten(0, 1)[: len(dataset)]


def _all_gather_cat(x, dim):
    x = x.contiguous()  # NCCL takes contiguous tensors only (gloo does not check)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim)


@torch.no_grad()
def knn_predict(bank, bank_labels, queries, num_classes, k=200, temperature=0.07, chunk=1024, sharded=False,
                normalized=False):
    """Class scores of each query: its k most cosine-similar bank features vote with weight
    exp(similarity / temperature). Returns (num_queries, num_classes) in fp32. normalized=True: bank and
    queries are already L2-normalised (no copy of the bank is made).

    sharded=True (under torch.distributed): `bank` is this rank's shard of the whole bank and every rank passes
    the same queries; each rank's k nearest are gathered and the k nearest of all of them vote, exactly as over
    the whole bank. k is capped at the size of the (whole) bank."""
    if not normalized:
        bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    size = len(bank)
    if sharded:
        size = torch.tensor(size, device=bank.device)
        dist.all_reduce(size)
        size = int(size)
    k = min(k, size)
    scores = []
    for q in queries.to(bank.dtype).split(chunk):
        sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # Q x k
        labels = bank_labels[idx]
        if sharded:  # a shard smaller than k pads with -inf similarities, which get no vote
            sim = F.pad(sim.float(), (0, k - sim.shape[1]), value=float("-inf"))
            labels = F.pad(labels, (0, k - labels.shape[1]))
            sim, labels = _all_gather_cat(sim, 1), _all_gather_cat(labels, 1)  # Q x (W k)
            sim, best = sim.topk(k, dim=1)
            labels = labels.gather(1, best)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, labels, (sim.float() / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of queries whose label is among the top-k scores, for each k (k capped at the class count)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


def knn_accuracy(backbone, train_set, val_set, k, temperature, batch_size, num_workers, device, precision,
                 rank=0, world_size=1):
    """Top-1 and top-5 kNN accuracy (percent) of `backbone` with the labelled train_set as the bank. The bank
    stays sharded over ranks and, on GPUs, in fp16 (see the module's docstring)."""
    store = torch.float16 if device.type == "cuda" else torch.float32
    bank, bank_labels = extract_features(backbone, train_set, batch_size, num_workers, device, precision,
                                         rank, world_size, gather=False, normalize=True, dtype=store)
    queries, labels = extract_features(backbone, val_set, batch_size, num_workers, device, precision,
                                       rank, world_size, normalize=True, dtype=store)
    num_classes = torch.stack([bank_labels.max(), labels.max()]).max()
    if world_size > 1:
        dist.all_reduce(num_classes, op=dist.ReduceOp.MAX)
    scores = knn_predict(bank, bank_labels, queries, int(num_classes) + 1, k, temperature,
                         sharded=world_size > 1, normalized=True)
    top1, top5 = topk_correct(scores, labels)
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


class KnnMonitor:
    """The online kNN check of a pre-training run every cfg.knn_every epochs (0: never): the labelled train
    split is the bank and val the queries, both with the evaluation transform, k = cfg.knn_k, T =
    cfg.knn_temperature. The splits are built and checked when the monitor is made, at start-up, so a missing
    val/ or an unlabelled folder stops the run at once rather than after knn_every epochs."""

    def __init__(self, cfg, rank, world_size, device, precision):
        self.cfg, self.rank, self.world_size, self.device, self.precision = cfg, rank, world_size, device, precision
        self.splits = None
        if cfg.knn_every:
            self.splits = [Transformed(labelled_split(cfg.dataset, cfg.data_dir, split, cfg.download, cfg.image_size,
                                                      cfg.bad_images), eval_transform(cfg.image_size, cfg.dataset))
                           for split in ("train", "val")]

    def after_epoch(self, epoch, step, backbone, log):
        """Run the check if `epoch` (1-based) is one of its epochs (every knn_every-th and the last); log
        eval/knn_top1 and eval/knn_top5."""
        if not self.splits or (epoch % self.cfg.knn_every and epoch != self.cfg.epochs):
            return
        cfg = self.cfg
        top1, top5 = knn_accuracy(backbone, *self.splits, cfg.knn_k, cfg.knn_temperature, 2 * cfg.batch_size,
                                  cfg.num_workers, self.device, self.precision, self.rank, self.world_size)
        log.write(step=step, epoch=epoch, **{"eval/knn_top1": top1, "eval/knn_top5": top5})
        if self.rank == 0:
            tqdm.write(f"epoch {epoch}: kNN top-1 {top1:.2f}%  top-5 {top5:.2f}%")
