"""Weighted kNN classification on frozen features (InstDisc / DINO protocol), and feature extraction
that shards a dataset over ranks and gathers the features back in dataset order."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, num_workers, device, precision_ctx, rank=0, world_size=1):
    """Features and labels of the whole dataset on every rank. Rank r embeds items r, r+W, r+2W, ...
    (no padding, so nothing is counted twice); the shards are then gathered and put back in order."""
    was_training = backbone.training
    backbone.eval()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, y in loader:
        with precision_ctx:
            f = backbone(images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world_size == 1:
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


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=200, temperature=0.07, chunk=1024):
    """Class scores of each query: its k most cosine-similar training features vote with weight
    exp(similarity / temperature). Returns (num_queries, num_classes)."""
    bank = F.normalize(train_feats, dim=1)
    k = min(k, len(bank))
    scores = []
    for q in F.normalize(query_feats, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # Q x k
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of queries whose label is among the top-k scores, for each k (k capped at the class count)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


def knn_accuracy(backbone, train_set, val_set, k, temperature, batch_size, num_workers, device, precision_ctx,
                 rank=0, world_size=1):
    """Top-1 and top-5 kNN accuracy (percent) of `backbone` with the labelled train_set as the bank."""
    bank, bank_labels = extract_features(backbone, train_set, batch_size, num_workers, device, precision_ctx,
                                         rank, world_size)
    queries, labels = extract_features(backbone, val_set, batch_size, num_workers, device, precision_ctx,
                                       rank, world_size)
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    top1, top5 = topk_correct(knn_predict(bank, bank_labels, queries, num_classes, k, temperature), labels)
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)
