"""Views made a whole batch at a time, on the device that trains (`views: batched`), instead of one image at a
time in loader workers (common/augment.py). The same steps as augment.view() (random resized crop, flip,
colour jitter in a random order, grayscale, Gaussian blur, solarisation, normalisation), each image with its
own random parameters drawn from the same distributions as torchvision's transforms, by a CPU torch.Generator
seeded per global batch (BatchedLoader). Each step is one tensor operation on the images that take it.

Departures from the per-image pipeline, all within rounding: it works in float32 from the start (torchvision's
uint8 and PIL kernels round to integers after each step).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset
from torchvision.transforms.v2.functional import pil_to_tensor

from common.augment import MEAN_STD, blur_kernel_size
from common.config import UsageError
from common.data import EpochSampler, labels_of

GRAY = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601-2) luma weights


def crop_boxes(n, height, width, scale, ratio, generator):
    """RandomResizedCrop's boxes for n images of height x width, as (n, 4) float (left, top, width, height) in
    pixels. torchvision's rule for each image: up to 10 tries of an area fraction ~ U(scale) and an aspect ratio
    log-uniform in `ratio`, rounded to whole pixels; the first that fits, at a uniform whole-pixel position; if
    none fits, the central crop with the aspect ratio clamped to `ratio`."""
    tries = 10
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * log_ratio.exp()).sqrt().round()  # round half to even, as Python's round()
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    if width / height < min(ratio):  # the fallback: the whole image, or its centre at the nearest allowed ratio
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
    position = torch.rand(n, 2, generator=generator)  # randint(0, free + 1) per image
    top = (position[:, 0] * (height - h + 1)).floor().clamp(max=height - h)
    left = (position[:, 1] * (width - w + 1)).floor().clamp(max=width - w)
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return torch.stack((left, top, w, h), dim=1)


def _resize_weights(start, length, size, full):
    """(n, size, full) weights that resize each image's pixels [start, start + length) along one axis to size:
    torchvision's antialiased bilinear (PIL's filter): output pixel i is the normalised triangle-weighted mean of
    the crop's pixels around its centre (i + 0.5) * length / size, the triangle's half-width max(1, length /
    size); for a crop no larger than the output this is plain bilinear interpolation, edges clamped."""
    scale = length / size
    centre = scale[:, None] * (torch.arange(size, device=length.device) + 0.5)  # in the crop's pixels
    pixel = torch.arange(full, device=length.device) - start[:, None]  # each pixel's index inside the crop
    distance = (pixel[:, None, :] + 0.5 - centre[:, :, None]) / scale.clamp(min=1)[:, None, None]
    weights = (1 - distance.abs()).clamp(min=0) * ((pixel >= 0) & (pixel < length[:, None]))[:, None, :]
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crops(images, boxes, size):
    """Each image's box (left, top, width, height) cut out and resized to size x size, as torchvision's
    resized_crop(..., antialias=True) does: two batched matrix products with each image's resize weights."""
    rows = _resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-2])  # (n, size, H)
    columns = _resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-1])  # (n, size, W)
    return rows.unsqueeze(1) @ images @ columns.transpose(1, 2).unsqueeze(1)


def grayscale(x):
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    return (GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]).unsqueeze(1)


def _per_image(values, x):
    return values.view(-1, *[1] * (x.ndim - 1))


def adjust_brightness(x, factor):
    return (x * _per_image(factor, x)).clamp(0, 1)


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_image(factor, x)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x, factor):
    factor = _per_image(factor, x)
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotates each image's hue by shift (a fraction of a turn, in [-0.5, 0.5]): RGB -> HSV, h + shift, -> RGB."""
    low, high = torch.aminmax(x, dim=1)
    spread = high - low
    gray = spread == 0
    saturation = spread / torch.where(gray, 1.0, high)
    r, g, b = ((high.unsqueeze(1) - x) / torch.where(gray, 1.0, spread).unsqueeze(1)).unbind(1)
    red, green = high == x[:, 0], high == x[:, 1]
    hue = torch.where(red, b - g, torch.where(green, 2.0 + r - b, 4.0 + g - r))
    hue = (hue / 6.0 + _per_image(shift, hue)).remainder(1.0)
    # back to RGB: channel n (5 red, 3 green, 1 blue) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (n + 6.0 * hue.unsqueeze(1)).remainder(6.0)
    value, saturation = high.unsqueeze(1), saturation.unsqueeze(1)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0, 1)


JITTER_STEPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x, kernel_size, sigma):
    """Each image blurred with its own sigma (a separable kernel of kernel_size taps, reflected borders)."""
    n, c, height, width = x.shape
    taps = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernel = torch.softmax(-(taps / sigma[:, None]) ** 2 / 2, dim=1)  # (n, k), rows sum to 1
    kernel = kernel.repeat_interleave(c, dim=0)  # one row per (image, channel)
    pad = kernel_size // 2
    x = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return x.view(n, c, height, width)


def solarize(x):
    """torchvision's RandomSolarize(threshold=128) on uint8 images: values of 128/255 and above inverted."""
    return torch.where(x >= 128 / 255, 1.0 - x, x)


class BatchedView:
    """One view of augment.view(), made for a batch: call it with (n, 3, H, W) uint8 images (or float in
    [0, 1]) on any device and a CPU torch.Generator; returns (n, 3, size, size) float32, normalised.
    sample() draws each image's parameters (the distributions of the per-image pipeline), apply() uses them."""

    def __init__(self, size, dataset, jitter, blur, solarize, scale=(0.08, 1.0), gray=0.2, ratio=(3 / 4, 4 / 3),
                 jitter_p=0.8):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.jitter_p, self.gray, self.solarize = jitter_p, gray, solarize
        b, c, s, h = jitter  # torchvision's ColorJitter ranges: [max(0, 1 - v), 1 + v], hue [-h, h]
        self.jitter = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self.kernel_size = blur_kernel_size(size)  # 0: no blur at this size
        self.blur = blur if self.kernel_size else 0.0
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD.get(dataset, MEAN_STD["folder"]))

    def sample(self, n, height, width, generator):
        """Each of n images' random parameters, as a dict of CPU tensors with n rows (a CPU generator: the same
        parameters on every device, and which images take each step is known without waiting for the device)."""
        def uniform(low, high):
            return torch.empty(n).uniform_(low, high, generator=generator)

        def coin(p):
            return torch.rand(n, generator=generator) < p

        return {"box": crop_boxes(n, height, width, self.scale, self.ratio, generator),
                "flip": coin(0.5),
                "jitter": coin(self.jitter_p),
                "order": torch.rand(n, 4, generator=generator).argsort(dim=1),  # each image's order of the 4 steps
                "factors": torch.stack([uniform(*r) for r in self.jitter], dim=1),
                "gray": coin(self.gray),
                "blur": coin(self.blur),
                "sigma": uniform(0.1, 2.0),
                "solarize": coin(self.solarize)}

    def apply(self, images, p):
        """The views of `images` (on any device) at parameters p (from sample()); each step runs on the images
        that take it, and only on those."""
        device = images.device
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = resized_crops(x, p["box"].to(device), self.size)
        x = torch.where(_per_image(p["flip"].to(device), x), x.flip(-1), x)

        def some(mask, step, *per_image):  # x[i] = step(x[i], *per_image[i]) for the images where mask is set
            rows = mask.nonzero().squeeze(1)
            if len(rows):
                on_device = rows.to(device)
                x[on_device] = step(x[on_device], *(value[rows].to(device) for value in per_image))

        for slot in range(4):  # each image's four jitter steps in its own order (torchvision: randperm(4))
            for i, step in enumerate(JITTER_STEPS):
                some(p["jitter"] & (p["order"][:, slot] == i), step, p["factors"][:, i])
        some(p["gray"], lambda v: grayscale(v).expand_as(v))
        if self.blur > 0:
            some(p["blur"], lambda v, sigma: gaussian_blur(v, self.kernel_size, sigma), p["sigma"])
        if self.solarize > 0:
            some(p["solarize"], solarize)
        return (x - self.mean.to(device)) / self.std.to(device)

    def __call__(self, images, generator):
        return self.apply(images, self.sample(len(images), *images.shape[-2:], generator))


class BatchedViews:
    """augment.MultiView's views, made a batch at a time: a list of (n, 3, size, size) tensors, in its order.
    With rank and world_size, `images` are rows rank, rank + W, ... of a global batch of n * W images, and each
    view draws the parameters of the whole global batch (the same on every rank) and keeps those rows."""

    def __init__(self, multi_view):
        self.views = [BatchedView(**settings) for settings in multi_view.settings]

    def __call__(self, images, generator, rank=0, world_size=1):
        made = []
        for view in self.views:
            p = view.sample(len(images) * world_size, *images.shape[-2:], generator)
            made.append(view.apply(images, {name: value[rank::world_size] for name, value in p.items()}))
        return made


# ---- the in-memory source and the loader of `views: batched` ----
def as_uint8(dataset):
    """A data set's images as one (N, 3, H, W) uint8 tensor and its labels as (N,) int64: from the reader's
    arrays where it keeps them (CIFAR, STL-10, subsets of them), else by decoding each image once."""
    base, index = dataset, None
    if isinstance(dataset, Subset):
        base, index = dataset.dataset, list(dataset.indices)
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:
        images = torch.from_numpy(data if index is None else data[index])
        images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images  # CIFAR keeps H, W, 3
        return images.contiguous(), torch.tensor(labels_of(dataset), dtype=torch.int64)
    images, labels, sizes = [], [], set()
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(pil_to_tensor(image.convert("RGB")))
        labels.append(label)
        sizes.add(tuple(images[-1].shape[1:]))
        if len(sizes) > 1:
            raise UsageError(f"views: batched keeps the images in memory as one array, which needs one image size; "
                             f"found {sizes.pop()} and {sizes.pop()} (h, w); use --views workers for these images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def batch_seed(seed, epoch, batch):
    """The seed of global batch `batch` of `epoch`'s views (the per-image pipeline's rule, per batch)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + batch


class BatchedLoader:
    """pretrain_loader's stand-in for `views: batched`: the same images in the same global batches as the
    DataLoader of `views: workers` (DistributedSampler's permutation per seed and epoch, drop_last; rank r takes
    items r, r + W, ... of each global batch; loader.sampler.set_epoch(epoch, skip) as there), read from memory
    and turned into views a batch at a time on `device`. Each global batch's views come from a generator seeded
    by (seed, epoch, batch): every rank draws the parameters of the whole global batch and keeps its rows, so
    the views depend on neither the number of ranks nor a resume, and no generator state needs keeping."""

    def __init__(self, images, labels, views, batch_size, rank, world_size, seed, device):
        self.pixels, self.labels = images, labels.to(device)
        self.views, self.batch_size, self.rank, self.world_size = BatchedViews(views), batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.sampler = EpochSampler(DistributedSampler(range(len(images)), world_size, rank, shuffle=True,
                                                       seed=seed, drop_last=True))

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)  # (epoch, index) of this rank's items left in the epoch
        first = self.sampler.skip // self.batch_size  # the number of the first global batch left
        for k in range(len(self)):
            epoch = keys[0][0]
            index = torch.tensor([i for _, i in keys[k * self.batch_size:(k + 1) * self.batch_size]])
            images = self.pixels[index.to(self.pixels.device)].to(self.device, non_blocking=True)
            generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, first + k))
            yield self.views(images, generator, self.rank, self.world_size), self.labels[index.to(self.device)]


def batched_loader(dataset, views, cfg, rank, world_size, device):
    """A BatchedLoader of `dataset`, its images decoded once and kept on `device` (a GPU's memory when they take
    under a quarter of it, else pinned host memory, copied a batch at a time)."""
    images, labels = as_uint8(dataset)
    if device.type == "cuda" and images.numel() < torch.cuda.get_device_properties(device).total_memory // 4:
        images = images.to(device)
    elif device.type == "cuda":
        images = images.pin_memory()
    return BatchedLoader(images, labels, views, cfg.batch_size, rank, world_size, cfg.seed, device)
