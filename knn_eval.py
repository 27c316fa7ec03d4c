"""Weighted kNN evaluation of a frozen backbone (InstDisc, Wu et al. 2018; the protocol of DINO).

The trunk f embeds the labelled train split (the bank) and the val split (the queries) with the evaluation
transform (resize, centre crop, normalise); features are L2-normalised. Each query q takes its k most
cosine-similar bank features x_i, and class c gets the score

    score(c) = sum over those k neighbours with label c of exp(cos(q, x_i) / T),

top-1 / top-5 = how often the true class is the best / among the five best scores (k = 200, T = 0.07 as in
DINO; k is capped at the bank size). Every image is embedded once, also under torchrun, where the bank stays
sharded over the ranks (common/knn.py).

Input: a checkpoint of any method script (its "backbone" and "backbone_args"; dataset and data_dir default to
its training config), or a plain trunk state_dict, which needs --arch and --image_size (and --cifar_stem).
Output: the accuracies, printed and written as JSON (by default next to the checkpoint).

Run:
    python knn_eval.py --checkpoint runs/simclr/last.pt
    python knn_eval.py --checkpoint runs/simclr/last.pt --dataset cifar100 --data_dir data --download true
    python knn_eval.py --checkpoint resnet50_trunk.pth --arch resnet50 --image_size 224 --dataset folder \
        --data_dir /data/imagenet
    torchrun --nproc_per_node=4 knn_eval.py --checkpoint runs/simclr/last.pt
"""
import os
from dataclasses import dataclass

from common.augment import eval_transform
from common.checkpoints import load_backbone
from common.config import UsageError, parse_config, usage_errors
from common.data import Transformed, labelled_split, subset
from common.distributed import close_distributed, init_distributed, lost_rank_errors
from common.knn import knn_accuracy
from common.precision import resolve_precision
from common.run_folder import write_json


@dataclass
class Config:
    # input
    checkpoint: str = ""  # a method script's checkpoint (e.g. runs/simclr/last.pt) or a plain trunk state_dict
    arch: str = ""  # backbone override; required for a plain state_dict (empty = the checkpoint's)
    image_size: int = 0  # evaluation resolution; required for a plain state_dict (0 = the checkpoint's)
    cifar_stem: str = ""  # auto | true | false (empty = the checkpoint's, or auto for a plain state_dict)
    patch_size: int = 0  # ViT patch size (0 = the checkpoint's, or 16)
    # data
    dataset: str = ""  # cifar10 | cifar100 | stl10 | folder | synthetic (empty = the checkpoint's)
    data_dir: str = ""  # dataset root (empty = the checkpoint's, else "data")
    download: bool = False  # let torchvision download cifar10 / cifar100 / stl10 into data_dir
    train_subset: int = 0  # bank = a fixed random subset of this many train images (0 = all)
    val_subset: int = 0  # queries = a fixed random subset of this many val images (0 = all)
    seed: int = 0  # picks the subsets
    num_workers: int = 4  # data-loading processes per rank
    bad_images: str = "stop"  # an unreadable image file: stop (naming it) | skip (warn, use the next image)
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before the job stops
    # kNN
    k: int = 200  # neighbours that vote
    temperature: float = 0.07  # T of the vote weights exp(cos / T)
    batch_size: int = 256  # images per forward pass, per rank
    precision: str = "auto"  # auto (bf16 where native, else fp16 on GPU, fp32 on CPU) | bf16 | fp16 (GPU) | fp32
    # output
    out: str = ""  # JSON file (empty = <checkpoint without extension>_knn_<dataset>.json)


def eval_split(cfg, dataset, data_dir, split, size, n):
    """The eval-transformed train or val split (a fixed random subset of n items when n > 0)."""
    data = labelled_split(dataset, data_dir, split, cfg.download, size, cfg.bad_images)
    return Transformed(subset(data, n, cfg.seed), eval_transform(size, dataset))


def main(cfg):
    if not cfg.checkpoint:
        raise UsageError("--checkpoint is required (a method script's last.pt or a plain trunk state_dict)")
    if cfg.k < 1 or cfg.temperature <= 0 or cfg.batch_size < 1 or cfg.dist_timeout <= 0:
        raise UsageError("--k, --batch_size and --dist_timeout must be positive, --temperature above 0")
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    precision, why = resolve_precision(cfg.precision, device, rank == 0)
    backbone, _, args, trained = load_backbone(cfg.checkpoint, cfg.arch, cfg.image_size, cfg.cifar_stem,
                                               cfg.patch_size)
    dataset = cfg.dataset or trained.get("dataset")
    if not dataset:
        raise UsageError(f"{cfg.checkpoint} does not say which dataset it was trained on; pass --dataset")
    data_dir = cfg.data_dir or trained.get("data_dir", "data")
    size = args["image_size"]
    bank = eval_split(cfg, dataset, data_dir, "train", size, cfg.train_subset)
    queries = eval_split(cfg, dataset, data_dir, "val", size, cfg.val_subset)

    backbone = backbone.to(device).eval()
    top1, top5 = knn_accuracy(backbone, bank, queries, cfg.k, cfg.temperature, cfg.batch_size, cfg.num_workers,
                              device, precision, rank, world_size)

    if rank == 0:
        out = cfg.out or f"{os.path.splitext(cfg.checkpoint)[0]}_knn_{dataset}.json"
        k_used = min(cfg.k, len(bank))  # knn_predict caps k at the bank size
        capped = f", capped at the bank size {k_used}" if k_used < cfg.k else ""
        print(f"kNN (k={cfg.k}{capped}, T={cfg.temperature}) on {dataset}: top-1 {top1:.2f}%  "
              f"top-5 {top5:.2f}%  ({len(bank)} train, {len(queries)} val images) -> {out}")
        write_json({"top1": top1, "top5": top5, "k": cfg.k, "k_used": k_used, "temperature": cfg.temperature,
                    "dataset": dataset, "checkpoint": cfg.checkpoint, "num_train": len(bank),
                    "num_val": len(queries), "data_dir": data_dir, "backbone_args": args, "precision": precision,
                    "precision_reason": why, "world_size": world_size, "seed": cfg.seed}, out)
    close_distributed()


if __name__ == "__main__":
    with usage_errors(), lost_rank_errors():
        main(parse_config(Config))
