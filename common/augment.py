"""View pipelines of the papers (torchvision.transforms.v2), and the evaluation transform.

Presets (jitter = brightness, contrast, saturation, hue, applied with p 0.8; grayscale p 0.2):
  sym       SimCLR:          jitter 0.8/0.8/0.8/0.2, blur p 0.5
  sym_weak  MoCo v2:         jitter 0.4/0.4/0.4/0.1, blur p 0.5
  moco_v1   MoCo v1:         jitter 0.4/0.4/0.4/0.4, no blur (the official code jitters every image; here p 0.8)
  asym      BYOL and family: jitter 0.4/0.4/0.2/0.1; view 1 blur p 1.0, solarize 0; view 2 blur p 0.1,
                             solarize 0.2
Gaussian blur is left out below 96 px, as in the CIFAR recipes: at 32 px it destroys the image.
"""
import torch
import torchvision.transforms.v2 as T

from common.config import UsageError
from common.data import MEAN_STD

PRESETS = {
    "sym": [dict(jitter=(0.8, 0.8, 0.8, 0.2), blur=0.5, solarize=0.0)] * 2,
    "sym_weak": [dict(jitter=(0.4, 0.4, 0.4, 0.1), blur=0.5, solarize=0.0)] * 2,
    "moco_v1": [dict(jitter=(0.4, 0.4, 0.4, 0.4), blur=0.0, solarize=0.0)] * 2,
    "asym": [dict(jitter=(0.4, 0.4, 0.2, 0.1), blur=1.0, solarize=0.0),
             dict(jitter=(0.4, 0.4, 0.2, 0.1), blur=0.1, solarize=0.2)],
}


def _normalize(dataset):
    mean, std = MEAN_STD.get(dataset, MEAN_STD["folder"])
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


def blur_kernel_size(size):
    """The Gaussian blur's kernel for size-px views: about 10% of the image, odd; 0 (no blur) below 96 px."""
    return max(3, int(0.1 * size) // 2 * 2 + 1) if size >= 96 else 0


def view(size, dataset, jitter, blur, solarize, scale=(0.08, 1.0), gray=0.2):
    """One random view: crop, flip, colour jitter, grayscale, (blur), (solarize), normalise."""
    steps = [T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=gray)]
    if blur > 0 and blur_kernel_size(size):
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur))
    if solarize > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize))  # on uint8 images, before scaling
    return T.Compose(steps + _normalize(dataset))


class MultiView:
    """Applies each view to the same image: returns a list of views. `settings` keeps each view's arguments
    of view(), from which common/batched.py makes the same views a batch at a time."""

    def __init__(self, settings):
        self.settings = settings
        self.transforms = [view(**s) for s in settings]

    def __call__(self, image):
        return [t(image) for t in self.transforms]


def two_views(preset, size, dataset, scale=(0.08, 1.0)):
    if preset not in PRESETS:
        raise UsageError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return MultiView([dict(size=size, dataset=dataset, scale=scale, **p) for p in PRESETS[preset]])


def multi_crop(preset, dataset, global_size, local_size, num_local, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4)):
    """SwAV / DINO multi-crop: the two global views of `preset`, then `num_local` small crops."""
    views = [dict(size=global_size, dataset=dataset, scale=global_scale, **p) for p in PRESETS[preset]]
    local = PRESETS[preset][1] | dict(blur=0.5, solarize=0.0)
    views += [dict(size=local_size, dataset=dataset, scale=local_scale, **local) for _ in range(num_local)]
    return MultiView(views)


def eval_transform(size, dataset):
    """Deterministic: resize the shorter side to `size`, centre-crop a square, normalise. Only image folders
    above 64 px (ImageNet and the like, photos larger than the crop) take the usual 256/224 resize-then-crop;
    CIFAR and STL-10 images are evaluated whole."""
    steps = [T.Resize(size, antialias=True), T.CenterCrop(size)]
    if dataset == "folder" and size > 64:
        steps = [T.Resize(int(size * 256 / 224), antialias=True), T.CenterCrop(size)]
    return T.Compose(steps + _normalize(dataset))


def linear_train_transform(size, dataset):
    """The linear-probe training augmentation: random resized crop and flip."""
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
                     + _normalize(dataset))
