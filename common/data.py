"""Datasets for pre-training and evaluation, read by torchvision; plus reproducible views for resuming.

build_dataset(name, root, split) gives (image, label) pairs with PIL images:
  cifar10, cifar100   torchvision's readers; `download=True` fetches them into root
  stl10               'pretrain' = train + unlabeled (labels -1), 'train', 'val' (= test)
  folder              an ImageFolder tree: root/train and root/val if present, else root itself; a folder of
                      images without class sub-folders is read as unlabeled (labels -1)
  synthetic           deterministic random images of any size, ten classes, no files (offline smoke runs)

A folder's image that cannot be decoded (not an image, truncated) stops the run naming its path, or with
bad_images="skip" is replaced by the next readable image (see ReadableImages); the other datasets are read from
torchvision's array files and take the argument only to share one signature.
"""
import atexit
import hashlib
import itertools
import multiprocessing
import os
import signal
import sys

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, Subset

from common.config import UsageError

DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Synthetic(Dataset):
    """Random images whose colour depends on the class, so a kNN on them beats chance; same for every seed."""

    def __init__(self, n, image_size, num_classes=10, seed=0):
        self.n, self.size, self.num_classes, self.seed = n, image_size, num_classes, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = np.random.default_rng([self.seed, i])
        label = i % self.num_classes
        base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 157) % 256])
        pixels = base + g.normal(0, 60, (self.size, self.size, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), label


class ImageFiles(Dataset):
    """A flat folder of images without class sub-folders: unlabeled data (label -1)."""

    def __init__(self, root):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        self.targets = [-1] * len(self.files)
        self.samples = [(f, -1) for f in self.files]  # as ImageFolder's: where ReadableImages finds the path

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return img.convert("RGB"), -1


BAD_IMAGES = ("stop", "skip")
# what PIL raises for a file it cannot decode: UnidentifiedImageError and "image file is truncated" are OSErrors
# (so is a file deleted during the run); a few broken chunks raise SyntaxError, ValueError or EOFError
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)


def _reason(e):
    """Why a file could not be read, in a few words (without the path, which the message gives once)."""
    if isinstance(e, UnidentifiedImageError):  # its text names the file object ImageFolder opened
        return "not an image PIL can identify"
    return getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__


class ReadableImages(Dataset):
    """A folder data set (ImageFolder or ImageFiles) whose unreadable files are reported by their path. A file
    PIL cannot decode (not an image, cut short) is the image's fault; a failed system call (an I/O error, a stale
    network handle, a missing permission) is the storage's, and always stops the run, as skipping it would make
    the run depend on the storage's mood.

    bad_images="stop": reading one raises a UsageError naming the file. "skip": item i is the next readable
    image from i on (i + 1, i + 2, ..., wrapping around) with that image's label, with a one-line warning per bad
    path and process; the choice depends on the files alone, so batches keep their size and a run stays
    reproducible. targets, samples and classes are the wrapped data set's, so labels_of decodes nothing."""

    def __init__(self, dataset, root, bad_images="stop"):
        self.dataset, self.root, self.bad_images = dataset, root, bad_images
        self.samples, self.targets = dataset.samples, dataset.targets
        self.classes = getattr(dataset, "classes", [])
        self.warned = set()  # this process's bad paths already reported (each DataLoader worker has its own)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        for j in range(len(self)):
            k = (i + j) % len(self)
            try:
                return self.dataset[k]
            except UNREADABLE as e:
                path, reason = self.samples[k][0], _reason(e)
                if getattr(e, "errno", None) is not None:  # the file system failed (EIO, ESTALE, EACCES), not PIL
                    raise UsageError(f"cannot read image {path} ({reason}): the storage failed, not the image; "
                                     "check it, then run again to resume") from None
                if self.bad_images == "stop":
                    raise UsageError(f"cannot read image {path} ({reason}); delete or replace the file, or pass "
                                     "--bad_images skip to use the next image in its place") from None
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: unreadable image {path} ({reason}); using the next image instead",
                          file=sys.stderr, flush=True)
        raise UsageError(f"none of the {len(self)} images under {self.root!r} can be read (see the warnings "
                         "above); check the files")


def _missing(name, root, hint):
    return UsageError(f"{name} not found in {root!r}: {hint}")


def _folder(root, split, bad_images):
    if not os.path.isdir(root):
        raise _missing("image folder", root, "check --data_dir; it should hold train/ and val/ "
                       "(each with one sub-folder per class) or just images")
    sub = os.path.join(root, "val" if split == "val" else "train")
    if os.path.isdir(sub):
        root = sub
    elif split == "val":
        raise _missing("validation split", root, "evaluation needs a val/ sub-folder with one folder per class")
    has_classes = any(e.is_dir() for e in os.scandir(root))
    data = tvd.ImageFolder(root, allow_empty=True) if has_classes else ImageFiles(root)
    if len(data) == 0:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return ReadableImages(data, root, bad_images)


def build_dataset(name, root, split, download=False, image_size=32, bad_images="stop"):
    """split: 'pretrain' (what self-supervised training sees), 'train' (labelled) or 'val'. bad_images: what an
    unreadable file of a folder data set does, 'stop' (naming it) or 'skip' (see ReadableImages)."""
    if split not in ("pretrain", "train", "val"):
        raise ValueError(f"unknown split {split!r}")
    if bad_images not in BAD_IMAGES:
        raise UsageError(f"bad_images must be {' or '.join(BAD_IMAGES)}, got {bad_images!r}")
    if name == "synthetic":
        return Synthetic(256 if split == "val" else 1024, image_size, seed=1 if split == "val" else 0)
    if name == "folder":
        return _folder(root, split, bad_images)
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            return cls(root, train=split != "val", download=download)
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
            return tvd.STL10(root, split=stl_split, download=download)
    except (RuntimeError, OSError) as e:  # not there or corrupt; with --download: no network, a full disk
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        if download:  # urllib's URLError is an OSError
            raise UsageError(f"could not download {name} into {root!r} ({type(e).__name__}: {reason}); download "
                             f"it by hand into that folder (the files torchvision's {name} reader expects) and drop "
                             "--download, or use --dataset folder with an ImageFolder tree") from None
        raise _missing(name, root, "pass --download true to fetch it there, or point --data_dir at the "
                       f"folder that holds it ({type(e).__name__}: {reason})") from None
    raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def labelled_split(name, root, split, download=False, image_size=32, bad_images="stop"):
    """build_dataset for evaluation ('train' or 'val'), where every image needs its class label."""
    data = build_dataset(name, root, split, download, image_size, bad_images)
    if min(labels_of(data), default=-1) < 0:
        raise UsageError(f"the {split} split of {name} in {root!r} is empty or unlabelled; kNN and the linear probe "
                         "need labels (folder: train/ and val/, each with one sub-folder per class)")
    return data


LABEL_FRACTIONS = (1, 10, 100)  # % of the labelled train images an evaluation may use
# SimCLR's published ImageNet subsets (configs/label_fractions/README.md says where they come from)
LABEL_SPLITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "label_fractions")


def label_fraction_subset(dataset, percent, seed=0):
    """(subset, how it was chosen, sha1 of the chosen images) for `percent` % of a labelled train split: an image
    folder of ImageNet's classes (synset folders n01440764, ...) takes SimCLR's official 1 % / 10 % lists, which
    every file they name must be in; any other data set a seeded `percent` % of each class (at least one image
    a class). 100: the whole split."""
    if percent not in LABEL_FRACTIONS:
        raise UsageError(f"label_fraction must be one of {', '.join(map(str, LABEL_FRACTIONS))} (%), got {percent}")
    if percent == 100:
        return dataset, "all labels", ""
    samples, classes = getattr(dataset, "samples", None), getattr(dataset, "classes", [])
    if samples is not None and classes and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes):
        path = os.path.join(LABEL_SPLITS, f"imagenet_{percent}percent.txt")
        with open(path) as f:
            wanted = [line.strip() for line in f if line.strip()]
        index = {os.path.basename(file): i for i, (file, _) in enumerate(samples)}
        missing = [name for name in wanted if name not in index]
        if missing:
            raise UsageError(f"the official {percent} % ImageNet list names {len(missing)} files that are not in the "
                             f"train split (first: {missing[0]}); give the full ImageNet train folder as --data_dir")
        chosen = sorted(index[name] for name in wanted)
        names = sorted(wanted)
        how = f"SimCLR's official {percent} % list (configs/label_fractions/imagenet_{percent}percent.txt)"
    else:
        labels = torch.tensor(labels_of(dataset))
        generator, chosen = torch.Generator().manual_seed(seed), []
        for label in labels.unique().tolist():
            members = (labels == label).nonzero().flatten()
            keep = max(1, round(len(members) * percent / 100))
            chosen += members[torch.randperm(len(members), generator=generator)[:keep]].tolist()
        chosen.sort()
        names = [os.path.basename(samples[i][0]) for i in chosen] if samples is not None else chosen
        how = f"a seeded {percent} % of each class (seed {seed})"
    digest = hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()
    return Subset(dataset, chosen), how, digest


def subset(dataset, n, seed=0):
    """A fixed random subset of n items (all of them when n is 0)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, idx.sort().values.tolist())


class SeededViews(Dataset):
    """Applies a random `transform` with its randomness fixed by (seed, epoch, index).

    Views then depend neither on num_workers nor on whether workers persist across epochs, and a run
    resumed at an epoch boundary sees exactly the views that an uninterrupted run would have seen.
    Keys are (epoch, index) pairs, as produced by EpochSampler.
    """

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator untouched
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(image), label


class EpochSampler(Sampler):
    """Wraps a DistributedSampler and yields (epoch, index) keys for SeededViews. set_epoch(epoch, skip) leaves
    out this rank's first `skip` indices of the epoch (the batches a resumed run already trained on): they are
    never loaded, and the rest are exactly those the uninterrupted epoch would have given."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(self.sampler, self.skip, None))


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every DataLoader: SIGTERM / SIGUSR1 (SLURM sends them to every process of a job) are
    for the training process, which checkpoints and stops its workers; a worker they killed would make the
    loader fail mid-checkpoint. Workers that ignore SIGTERM would make multiprocessing's exit hook, which
    terminates and then joins daemonic children still alive (a loader held by an exception's traceback), wait
    forever: _kill_data_workers, registered after that hook and so run before it, kills them first."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register
def _kill_data_workers():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report the kill as a failure
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers (daemonic); never the processes of mp.spawn or torchrun
            child.kill()


class Transformed(Dataset):
    """A dataset with a deterministic transform (evaluation)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label


def labels_of(dataset):
    """All labels of a dataset without decoding its images where the reader keeps them."""
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return [int(t) for t in getattr(dataset, attr)]
    if isinstance(dataset, Synthetic):
        return [i % dataset.num_classes for i in range(len(dataset))]
    return [int(dataset[i][1]) for i in range(len(dataset))]
