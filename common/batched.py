"""Views made a whole batch at a time, on the device that trains (`views: batched`), instead of one image at a
time in loader workers (common/augment.py). The same steps as augment.view() (random resized crop, flip,
colour jitter in a random order, grayscale, Gaussian blur, solarisation, normalisation), each image with its
own random parameters drawn from the same distributions as torchvision's transforms, by a CPU torch.Generator
seeded per global batch. Each step is one tensor operation on the images that take it (the crop: one per group
of CUT_OUTS_A_GROUP images when the images differ in size). The parameters are drawn and arranged on the host (which images take each step
is known there) and reach the device in one pinned, non-blocking copy per view: no step waits for the host
(except DecodingLoader's, which lets the stream finish before nvJPEG decodes: pytorch/vision#9606).
Images come from memory (BatchedLoader: data sets read as one array) or, for image folders, from files read by
loader workers and decoded a batch at a time on the device (DecodingLoader: torchvision.io.decode_jpeg, nvJPEG on
a GPU).

Departures from the per-image pipeline, all within rounding: it works in float32 from the start (torchvision's
uint8 and PIL kernels round to integers after each step).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from common.augment import MEAN_STD, blur_kernel_size
from common.config import UsageError
from common.data import EpochSampler, ignore_stop_signals, labels_of
from common.precision import to_device

GRAY = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601-2) luma weights


def crop_draws(n, scale, ratio, generator):
    """The random numbers of RandomResizedCrop for n images, which do not depend on the images' sizes: per image,
    10 tries of an area fraction ~ U(scale) and a log aspect ratio ~ U(log ratio), and a uniform position."""
    tries = 10
    return {"area": torch.empty(n, tries).uniform_(*scale, generator=generator),
            "log_ratio": torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator),
            "position": torch.rand(n, 2, generator=generator)}


def boxes_of(draws, height, width, ratio):
    """RandomResizedCrop's boxes from crop_draws for images of height x width (ints, or (n,) tensors: each image's
    own size), as (n, 4) float (left, top, width, height) in pixels. torchvision's rule for each image: the first
    of the 10 tries whose area and aspect ratio, rounded to whole pixels, fit, at a uniform whole-pixel position;
    if none fits, the central crop with the aspect ratio clamped to `ratio`."""
    n = len(draws["area"])
    height = torch.as_tensor(height, dtype=torch.float32).expand(n)
    width = torch.as_tensor(width, dtype=torch.float32).expand(n)
    area = (height * width)[:, None] * draws["area"]
    w = (area * draws["log_ratio"].exp()).sqrt().round()  # round half to even, as Python's round()
    h = (area / draws["log_ratio"].exp()).sqrt().round()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    narrow, wide = width / height < min(ratio), width / height > max(ratio)
    fallback_w = torch.where(wide, (height * max(ratio)).round(), width)  # the whole image, or its centre at the
    fallback_h = torch.where(narrow, (width / min(ratio)).round(), height)  # nearest allowed aspect ratio
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    position = draws["position"]  # randint(0, free + 1) per image
    top = torch.minimum((position[:, 0] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((position[:, 1] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return torch.stack((left, top, w, h), dim=1)


def crop_boxes(n, height, width, scale, ratio, generator):
    """RandomResizedCrop's boxes for n images of height x width (see crop_draws and boxes_of)."""
    return boxes_of(crop_draws(n, scale, ratio, generator), height, width, ratio)


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


def _as_float(images):
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


# images of mixed sizes are resized a group at a time, each group's cut-outs zero-padded to its largest: a larger
# group launches fewer kernels, a smaller one pads less (a 2,500 x 2,000 outlier pads its group: 8 x 60 MB)
CUT_OUTS_A_GROUP = 8


def _padded(images):
    """(3, h, w) images of any sizes as one (n, 3, H, W) batch, zero-padded at the bottom and the right to the
    largest height and width (resized_crops gives the padding no weight: it lies outside every box)."""
    height, width = max(image.shape[-2] for image in images), max(image.shape[-1] for image in images)
    return torch.stack([F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
                        for image in images])


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
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1: made there, not copied
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
    [0, 1]; or a list of n images of any sizes) on any device and a CPU torch.Generator; returns (n, 3, size,
    size) float32, normalised.
    sample() draws each image's parameters (the distributions of the per-image pipeline), apply() uses them."""

    def __init__(self, size, dataset, jitter, blur, solarize, scale=(0.08, 1.0), gray=0.2, small_image_blur=False,
                 ratio=(3 / 4, 4 / 3), jitter_p=0.8):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.jitter_p, self.gray, self.solarize = jitter_p, gray, solarize
        b, c, s, h = jitter  # torchvision's ColorJitter ranges: [max(0, 1 - v), 1 + v], hue [-h, h]
        self.jitter = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
        self.kernel_size = blur_kernel_size(size, small_image_blur)  # 0: no blur at this size
        self.blur = blur if self.kernel_size else 0.0
        self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD.get(dataset, MEAN_STD["folder"]))

    def sample(self, n, generator):
        """Each of n images' random parameters, as a dict of CPU tensors with n rows; none depends on the images'
        sizes (a crop's box is worked out from them in apply()). A CPU generator: the same parameters on every
        device, and which images take each step is known without waiting for the device."""
        def uniform(low, high):
            return torch.empty(n).uniform_(low, high, generator=generator)

        def coin(p):
            return torch.rand(n, generator=generator) < p

        return {**crop_draws(n, self.scale, self.ratio, generator),
                "flip": coin(0.5),
                "jitter": coin(self.jitter_p),
                "order": torch.rand(n, 4, generator=generator).argsort(dim=1),  # each image's order of the 4 steps
                "factors": torch.stack([uniform(*r) for r in self.jitter], dim=1),
                "gray": coin(self.gray),
                "blur": coin(self.blur),
                "sigma": uniform(0.1, 2.0),
                "solarize": coin(self.solarize)}

    def steps(self, p):
        """The steps after the crop and the flip, in order, each as (step, which images take it (a mask), their
        per-image values): the four jitter steps in each image's own order, grayscale, blur, solarisation."""
        steps = [(step, p["jitter"] & (p["order"][:, slot] == i), [p["factors"][:, i]])
                 for slot in range(4) for i, step in enumerate(JITTER_STEPS)]  # torchvision: randperm(4) an image
        steps.append((lambda v: grayscale(v).expand_as(v), p["gray"], []))
        if self.blur > 0:
            steps.append((lambda v, sigma: gaussian_blur(v, self.kernel_size, sigma), p["blur"], [p["sigma"]]))
        if self.solarize > 0:
            steps.append((solarize, p["solarize"], []))
        return steps

    def plan(self, images, p):
        """On the host, before anything runs on the device: the crop boxes (left, top, width, height) in each image,
        the steps, the rows of the images that take each step, and everything the device needs as ONE float32
        tensor with the lengths of its parts, copied there at once: the boxes to resize (for images of mixed sizes,
        each one's box within its own cut-out), the flips, then each step's rows and their values. Which images
        take a step is known here, so no step waits for the device to count them."""
        if torch.is_tensor(images):
            boxes = resize = boxes_of(p, images.shape[-2], images.shape[-1], self.ratio)
        else:
            boxes = boxes_of(p, torch.tensor([image.shape[-2] for image in images]),
                             torch.tensor([image.shape[-1] for image in images]), self.ratio)
            resize = torch.cat([torch.zeros(len(boxes), 2), boxes[:, 2:]], dim=1)  # each cut-out resized whole
        steps = self.steps(p)
        rows = [mask.nonzero().squeeze(1) for _, mask, _ in steps]
        parts = [resize.flatten(), p["flip"].float(),
                 *(torch.cat([taken.float(), *(value[taken] for value in values)])
                   for (_, _, values), taken in zip(steps, rows))]
        return boxes, steps, rows, torch.cat(parts), [len(part) for part in parts]

    def apply(self, images, p):
        """The views of `images` (on any device: (n, 3, H, W) uint8 or float in [0, 1], or a list of n (3, h, w)
        of any sizes) at parameters p (from sample()); each step runs on the images that take it, and only on
        those. One copy to the device (plan()), no waiting for it."""
        if not torch.is_tensor(images) and len({image.shape for image in images}) == 1:
            images = torch.stack(images)
        device = images.device if torch.is_tensor(images) else images[0].device
        boxes, steps, rows, packed, lengths = self.plan(images, p)
        resize, flip, *taken = to_device(packed, device).split(lengths)
        resize = resize.view(-1, 4)
        if torch.is_tensor(images):
            x = resized_crops(_as_float(images), resize, self.size)
        else:  # each box cut out (host ints: views, no copy), then resized CUT_OUTS_A_GROUP at a time
            cut = [image[:, top:top + h, left:left + w] for image, (left, top, w, h) in zip(images,
                                                                                           boxes.int().tolist())]
            x = torch.cat([resized_crops(_as_float(_padded(cut[i:i + CUT_OUTS_A_GROUP])),
                                         resize[i:i + CUT_OUTS_A_GROUP], self.size)
                           for i in range(0, len(cut), CUT_OUTS_A_GROUP)])
        x = torch.where(_per_image(flip.bool(), x), x.flip(-1), x)
        for (step, _, values), on_host, part in zip(steps, rows, taken):
            if len(on_host):  # x[i] = step(x[i], *values[i]) for the images i that take it
                index, *per_image = part.view(1 + len(values), len(on_host))  # the rows: exact in float32
                index = index.long()
                x[index] = step(x[index], *per_image)
        if self.mean.device != device:  # the constants copied once, not every step
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return (x - self.mean) / self.std

    def __call__(self, images, generator):
        return self.apply(images, self.sample(len(images), generator))


class BatchedViews:
    """augment.MultiView's views, made a batch at a time: a list of (n, 3, size, size) tensors, in its order.
    With rank and world_size, `images` are rows rank, rank + W, ... of a global batch of n * W images, and each
    view draws the parameters of the whole global batch (the same on every rank) and keeps those rows."""

    def __init__(self, multi_view):
        self.views = [BatchedView(**settings) for settings in multi_view.settings]

    def __call__(self, images, generator, rank=0, world_size=1):
        made = []
        for view in self.views:
            p = view.sample(len(images) * world_size, generator)
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
        self.pixels, self.labels = images, labels  # the pixels on the device or the host, the labels on the host
        self.views, self.batch_size, self.rank, self.world_size = BatchedViews(views), batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.sampler = EpochSampler(DistributedSampler(range(len(images)), world_size, rank, shuffle=True,
                                                       seed=seed, drop_last=True))

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)  # (epoch, index) of this rank's items left in the epoch
        order = torch.tensor([i for _, i in keys], dtype=torch.int64)
        first = self.sampler.skip // self.batch_size  # the number of the first global batch left
        for k in range(len(self)):
            epoch, index = keys[0][0], order[k * self.batch_size:(k + 1) * self.batch_size]
            if self.pixels.device == self.device:  # the rows picked where the pixels are
                images = self.pixels[to_device(index, self.device)]
            else:  # a GPU's batch picked from host memory, then copied (pinned, non-blocking)
                images = to_device(self.pixels[index], self.device)
            generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, first + k))
            yield (self.views(images, generator, self.rank, self.world_size),
                   to_device(self.labels[index], self.device))


# ---- image folders: files read by loader workers, decoded a batch at a time on the device ----
class EncodedImages(Dataset):
    """A folder data set's items, by (epoch, index) keys as EpochSampler gives them, as (epoch, index, data,
    label, is_jpeg): a JPEG's bytes (uint8, 1-d), to be decoded with the rest of its batch on the training device,
    or any other file decoded here by PIL (uint8 (3, h, w)), as are files that cannot be read (the data set's
    bad_images rule then applies, see common/data.py's ReadableImages)."""

    def __init__(self, dataset):
        self.dataset, base, self.index = dataset, dataset, None
        if isinstance(dataset, Subset):
            base, self.index = dataset.dataset, list(dataset.indices)
        self.samples = base.samples

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        path, label = self.samples[i if self.index is None else self.index[i]]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        if data[:2] == b"\xff\xd8":  # a JPEG's start-of-image marker
            return epoch, i, torch.frombuffer(bytearray(data), dtype=torch.uint8), label, True
        image, label = self.dataset[i]
        return epoch, i, pil_to_tensor(image.convert("RGB")), label, False


class DecodingLoader:
    """pretrain_loader's stand-in for `views: batched` on an image folder: the same global batches as the
    DataLoader of `views: workers` (and as BatchedLoader), its files read by num_workers loader processes and
    their JPEGs decoded a batch at a time on `device` (torchvision.io.decode_jpeg: on a GPU, nvJPEG), images of
    any sizes; then the same batched views as BatchedLoader's, from the same per-(seed, epoch, batch)
    generators. A JPEG the device's decoder rejects (a CMYK or broken file) is decoded by PIL instead. The batches
    hold the same images as with workers; their pixels can differ from PIL's by the decoders' rounding, and a JPEG
    that libjpeg or nvJPEG decodes but PIL rejects trains here, where `workers` stops or skips it."""

    def __init__(self, dataset, views, cfg, rank, world_size, device):
        self.files, self.views = EncodedImages(dataset), BatchedViews(views)
        self.batch_size, self.rank, self.world_size, self.seed, self.device = (cfg.batch_size, rank, world_size,
                                                                               cfg.seed, device)
        self.sampler = EpochSampler(DistributedSampler(self.files, world_size, rank, shuffle=True, seed=cfg.seed,
                                                       drop_last=True))
        self.reader = DataLoader(self.files, cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
                                 collate_fn=list, persistent_workers=cfg.num_workers > 0, drop_last=True,
                                 worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed))

    def __len__(self):
        return len(self.reader)

    def decode(self, items):
        """The images of a batch of EncodedImages items, on the device, and their labels."""
        images, labels = [data for _, _, data, _, _ in items], [label for _, _, _, label, _ in items]
        jpegs = [n for n, item in enumerate(items) if item[4]]
        encoded = [images[n] for n in jpegs]
        if encoded and self.device.type == "cuda":
            # nvJPEG's hardware decoder does not wait for the work queued on the caller's stream, so it can write
            # into freed memory that queued kernels still read (pytorch/vision#9606): let that work finish first
            torch.cuda.current_stream(self.device).synchronize()
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device) if encoded else []
        except torch.OutOfMemoryError:  # the device's trouble, not a file's
            raise
        except RuntimeError:  # one of them the decoder cannot read: each on its own, PIL for those it rejects
            decoded = []
            for n, data in zip(jpegs, encoded):
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError:
                    image, labels[n] = self.files.dataset[items[n][1]]
                    decoded.append(pil_to_tensor(image.convert("RGB")))
        for n, image in zip(jpegs, decoded):
            images[n] = image
        images = [to_device(image, self.device) if image.device != self.device else image for image in images]
        return images, to_device(torch.tensor(labels, dtype=torch.int64), self.device)

    def __iter__(self):
        first = self.sampler.skip // self.batch_size  # the number of the first global batch left
        for k, items in enumerate(self.reader):
            images, labels = self.decode(items)
            generator = torch.Generator().manual_seed(batch_seed(self.seed, items[0][0], first + k))
            yield self.views(images, generator, self.rank, self.world_size), labels


def batched_loader(dataset, views, cfg, rank, world_size, device):
    """The loader of `views: batched`: for an image folder, a DecodingLoader (files decoded a batch at a time on
    `device`); else a BatchedLoader of `dataset`, its images decoded once and kept on `device` when they take
    under a quarter of a GPU's memory, else in host memory, each batch gathered there into pinned memory and
    copied without waiting (no pinned copy of the whole data set on every rank)."""
    if cfg.dataset == "folder":
        return DecodingLoader(dataset, views, cfg, rank, world_size, device)
    images, labels = as_uint8(dataset)
    if device.type == "cuda" and images.numel() < torch.cuda.get_device_properties(device).total_memory // 4:
        images = images.to(device)
    return BatchedLoader(images, labels, views, cfg.batch_size, rank, world_size, cfg.seed, device)
