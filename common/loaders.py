"""The pre-training loader of a method script, over both view paths: views made per image in DataLoader workers
(common/data.py's SeededViews) or a batch at a time on the training device (common/batched.py). Above both, so
that neither imports the other's caller."""
import torch
from torch.utils.data import DataLoader, DistributedSampler

from common.batched import batched_loader
from common.config import UsageError
from common.data import EpochSampler, SeededViews, build_dataset, ignore_stop_signals, subset


def pretrain_loader(cfg, views, rank, world_size, device):
    """The pre-training loader of a method script: cfg.dataset's 'pretrain' split (a fixed random cfg.subset of
    it), each image turned into `views` (two views or multi-crop), and this rank's share of every global batch.
    Call loader.sampler.set_epoch(epoch) each epoch; loader.images is the data set. With views made per image
    (cfg.views, views_on_device) a DataLoader whose views' randomness is fixed by (seed, epoch, index); made a
    batch at a time, a common/batched.py BatchedLoader, or DecodingLoader for an image folder (the same batches;
    randomness fixed by (seed, epoch, global batch)).

    DistributedSampler's permutation depends on the seed and the epoch only, and rank r takes its items r, r + W,
    ...: global batch b is items [b * G, (b + 1) * G) of the permutation for any split of the global batch G over
    W ranks, so a run resumed on another number of ranks with the same G sees the same images in every batch.
    The same holds for the batches left in an epoch: set_epoch(epoch, skip=k * batch_size) starts at global
    batch k on any number of ranks (a mid-epoch resume)."""
    images = subset(build_dataset(cfg.dataset, cfg.data_dir, "pretrain", cfg.download, cfg.image_size,
                                  cfg.bad_images), cfg.subset, cfg.seed)
    if views_on_device(cfg):
        loader = batched_loader(images, views, cfg, rank, world_size, device)
    else:
        train_set = SeededViews(images, views, seed=cfg.seed)
        sampler = EpochSampler(DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed,
                                                  drop_last=True))
        # its own generator: drawing worker seeds never moves the global one, which a mid-epoch resume restores
        loader = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                            drop_last=True, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise UsageError(f"{len(images)} images make no full batch of {cfg.batch_size} x {world_size} "
                         "ranks; lower --batch_size")
    loader.images = images  # the data set before views (its labels: labels_of(loader.images))
    return loader


VIEWS = ("auto", "batched", "workers")
IN_MEMORY = ("cifar10", "cifar100", "stl10", "synthetic")  # read into memory by their readers


def views_on_device(cfg):
    """cfg.views: 'batched' (views made a batch at a time on the training device, common/batched.py: the images
    decoded once and kept in memory, or an image folder's files decoded a batch at a time on the device), 'workers'
    (one image at a time in num_workers loader processes), or 'auto': batched for the data sets whose readers
    hold them in memory, workers for image folders."""
    if cfg.views not in VIEWS:
        raise UsageError(f"views must be {', '.join(VIEWS)}, got {cfg.views!r}")
    return cfg.views == "batched" or (cfg.views == "auto" and cfg.dataset in IN_MEMORY)
