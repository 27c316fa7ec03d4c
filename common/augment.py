"""View pipelines of the papers (torchvision.transforms.v2), and the evaluation transform.

Presets (jitter = brightness, contrast, saturation, hue, applied with p 0.8; grayscale p 0.2):
  sym       SimCLR:          jitter 0.8/0.8/0.8/0.2, blur p 0.5
  sym_weak  MoCo v2:         jitter 0.4/0.4/0.4/0.1, blur p 0.5
  moco_v1   MoCo v1:         jitter 0.4/0.4/0.4/0.4, no blur (the official code jitters every image; here p 0.8)
  asym      BYOL and family: jitter 0.4/0.4/0.2/0.1; view 1 blur p 1.0, solarize 0; view 2 blur p 0.1,
                             solarize 0.2
Gaussian blur is left out below 96 px, as in solo-learn's asymmetric CIFAR recipes (blur p 0 / 0). With
`small_image_blur` (a shared config key) views below 96 px keep their preset's blur probability, as solo-learn's
MoCo v2+, MoCo v3, SimCLR, SimSiam and SwAV CIFAR-10 runs did (PIL's GaussianBlur, radius = sigma ~ U(0.1, 2)), with
a 13-tap kernel (see blur_kernel_size). `jitter` (a shared config key) replaces the preset's four jitter
strengths in every view.
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


def blur_kernel_size(size, small_image_blur=False):
    """The Gaussian blur's kernel for size-px views: about 10% of the image, odd, at 96 px and above. Below 96 px
    0 (no blur), or with small_image_blur 13 taps, 2 ceil(3 sigma) + 1 at the largest sigma, 2: +-3 sigma, where
    PIL's GaussianBlur(radius=sigma) of the CIFAR runs keeps about as much of the Gaussian; never wider than the
    image (the largest odd size within it, which the reflected border needs): 13 at 32 px, 11 at 12 px."""
    if size >= 96:
        return max(3, int(0.1 * size) // 2 * 2 + 1)
    return min(13, (size - 1) // 2 * 2 + 1) if small_image_blur else 0


def view(size, dataset, jitter, blur, solarize, scale=(0.08, 1.0), gray=0.2, small_image_blur=False):
    """One random view: crop, flip, colour jitter, grayscale, (blur), (solarize), normalise."""
    steps = [T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=gray)]
    kernel_size = blur_kernel_size(size, small_image_blur)
    if blur > 0 and kernel_size:
        steps.append(T.RandomApply([T.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=blur))
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


def preset_views(preset, jitter=None, small_image_blur=False):
    """The two global views' settings of `preset`: its own, or with `jitter` (brightness, contrast, saturation,
    hue) in place of its jitter strengths; small_image_blur as in blur_kernel_size."""
    if preset not in PRESETS:
        raise UsageError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if jitter is not None and (len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5):
        raise UsageError(f"jitter takes 4 strengths (brightness, contrast, saturation, hue), none negative and hue "
                         f"at most 0.5, got {list(jitter)}")
    changes = dict(small_image_blur=small_image_blur) | ({} if jitter is None else dict(jitter=tuple(jitter)))
    return [p | changes for p in PRESETS[preset]]


def two_views(preset, size, dataset, scale=(0.08, 1.0), jitter=None, small_image_blur=False):
    return MultiView([dict(size=size, dataset=dataset, scale=scale, **p)
                      for p in preset_views(preset, jitter, small_image_blur)])


def multi_crop(preset, dataset, global_size, local_size, num_local, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), jitter=None, small_image_blur=False):
    """SwAV / DINO multi-crop: the two global views of `preset`, then `num_local` small crops (the second global
    view's settings, blur p 0.5, no solarisation)."""
    presets = preset_views(preset, jitter, small_image_blur)
    views = [dict(size=global_size, dataset=dataset, scale=global_scale, **p) for p in presets]
    local = presets[1] | dict(blur=0.5, solarize=0.0)
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
