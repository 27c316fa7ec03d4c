"""common/batched.py: each batched step equals torchvision's functional op at the same parameters, and the
per-image parameters follow the per-image pipeline's distributions (two-sample Kolmogorov-Smirnov tests on
thousands of draws, at fixed seeds so that the tests are deterministic)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from PIL import Image

from common.augment import PRESETS, multi_crop, two_views
from common.batched import (BatchedLoader, BatchedView, BatchedViews, DecodingLoader, adjust_brightness,
                            adjust_contrast, adjust_hue, adjust_saturation, as_uint8, boxes_of, crop_boxes,
                            gaussian_blur, resized_crops, solarize)
from common.config import UsageError
from common.data import MEAN_STD
from common.loaders import pretrain_loader

DRAWS = 4000


def ks_statistic(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    values = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b)).max()


def assert_same_distribution(a, b):
    """KS at the 0.1% level: the gap stays below 1.95 sqrt((n + m) / (n m)) when both come from one law."""
    limit = 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    assert ks_statistic(a, b) < limit, (ks_statistic(a, b), limit)


def assert_same_rate(hits, p):
    """A coin's rate over DRAWS flips within 4.5 standard deviations of p."""
    rate = float(torch.as_tensor(hits).float().mean())
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9, (rate, p)


@pytest.mark.parametrize("height, width, scale, ratio", [(320, 320, (0.08, 1.0), (3 / 4, 4 / 3)),  # little rounding
                                                         (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                         (32, 32, (0.14, 1.0), (3 / 4, 4 / 3)),
                                                         (24, 40, (0.4, 1.0), (3 / 4, 4 / 3)),
                                                         (40, 24, (0.9, 1.0), (2.0, 3.0))])  # often falls back
def test_crop_boxes_follow_random_resized_crop(height, width, scale, ratio):
    torch.manual_seed(0)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    crop = T.RandomResizedCrop(16, scale=scale, ratio=ratio)
    ours = crop_boxes(DRAWS, height, width, scale, ratio, torch.Generator().manual_seed(1))
    theirs = [crop.make_params([image]) for _ in range(DRAWS)]
    theirs = torch.tensor([[p["left"], p["top"], p["width"], p["height"]] for p in theirs], dtype=torch.float)
    for column in range(4):  # left, top, width, height
        assert_same_distribution(ours[:, column], theirs[:, column])
    assert_same_distribution(ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3])  # the area
    assert_same_distribution(ours[:, 2] / ours[:, 3], theirs[:, 2] / theirs[:, 3])  # the aspect ratio
    assert torch.equal(ours, ours.round()) and (ours[:, 2:] >= 1).all()  # whole pixels, inside the image
    assert (ours[:, 0] + ours[:, 2] <= width).all() and (ours[:, 1] + ours[:, 3] <= height).all()


def test_jitter_blur_and_coins_follow_the_per_image_pipeline():
    torch.manual_seed(0)
    spec = PRESETS["sym"][0]
    view = BatchedView(96, "folder", **spec, scale=(0.2, 1.0))
    p = view.sample(DRAWS, torch.Generator().manual_seed(2))
    jitter = T.ColorJitter(*spec["jitter"])
    theirs = [jitter.make_params([]) for _ in range(DRAWS)]
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    for i, name in enumerate(names):
        assert_same_distribution(p["factors"][:, i], [t[name] for t in theirs])
    orders = {tuple(o.tolist()) for o in p["order"]}
    assert len(orders) == 24  # every order of the four steps, each about 1/24 of the time
    first = torch.stack([t["fn_idx"] for t in theirs])[:, 0]
    for step in range(4):
        assert_same_rate(p["order"][:, 0] == step, float((first == step).float().mean()))
    blur = T.GaussianBlur(9, sigma=(0.1, 2.0))
    assert_same_distribution(p["sigma"], [blur.make_params([])["sigma"][0] for _ in range(DRAWS)])
    assert_same_rate(p["flip"], 0.5)
    assert_same_rate(p["jitter"], 0.8)
    assert_same_rate(p["gray"], 0.2)
    assert_same_rate(p["blur"], spec["blur"])
    asym = BatchedView(32, "cifar10", **PRESETS["asym"][1]).sample(DRAWS, torch.Generator().manual_seed(3))
    assert_same_rate(asym["solarize"], 0.2)
    assert not asym["blur"].any()  # no blur below 96 px (augment.view's rule)


def test_each_step_equals_torchvision_at_the_same_parameters():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 40, 36)
    factors = torch.tensor([0.0, 0.3, 0.9, 1.0, 1.2, 1.5, 1.8, 2.0])
    for ours, theirs in [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                         (adjust_saturation, TF.adjust_saturation)]:
        expected = torch.stack([theirs(x[i], float(f)) for i, f in enumerate(factors)])
        torch.testing.assert_close(ours(x, factors), expected, atol=1e-6, rtol=0)
    shifts = torch.tensor([-0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.4, 0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(h)) for i, h in enumerate(shifts)])
    torch.testing.assert_close(adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)
    sigmas = torch.tensor([0.1, 0.3, 0.6, 1.0, 1.3, 1.6, 1.9, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [9, 9], [float(s)] * 2) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(gaussian_blur(x, 9, sigmas), expected, atol=1e-6, rtol=0)
    small = x[:, :, :32, :32]  # small_image_blur's kernel at 32 px
    expected = torch.stack([TF.gaussian_blur(small[i], [13, 13], [float(s)] * 2) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(gaussian_blur(small, 13, sigmas), expected, atol=1e-6, rtol=0)
    u8 = (x * 255).round().to(torch.uint8)
    expected = torch.stack([TF.solarize(u8[i], 128) for i in range(8)]).float() / 255
    torch.testing.assert_close(solarize(u8.float() / 255), expected, atol=1e-6, rtol=0)
    boxes = crop_boxes(8, 40, 36, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    for size in (8, 24, 64):  # smaller than most crops (antialiased), and larger (plain bilinear)
        expected = torch.stack([TF.resized_crop(x[i], int(top), int(left), int(h), int(w), [size, size],
                                                antialias=True) for i, (left, top, w, h) in enumerate(boxes)])
        torch.testing.assert_close(resized_crops(x, boxes, size), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, changes", [(96, {}),  # every step on: blur (96 px) and solarisation
                                           (32, dict(small_image_blur=True, jitter=(0.4, 0.4, 0.4, 0.1)))])
def test_a_view_equals_torchvisions_steps_in_the_images_own_order(size, changes):
    """apply() at sampled parameters equals torchvision's functional ops applied one image at a time, in the
    order of augment.view() and each image's jitter order; at 32 px with small_image_blur too (13 taps)."""
    images = torch.randint(0, 256, (16, 3, 112, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = BatchedView(size, "folder", **PRESETS["asym"][1] | changes)
    assert view.kernel_size == {96: 9, 32: 13}[size]
    p = view.sample(16, torch.Generator().manual_seed(4))
    boxes = boxes_of(p, 112, 100, view.ratio)
    p["blur"][:8], p["solarize"][::2], p["jitter"][::3] = True, True, False  # both branches of each coin
    steps = [lambda im, f: TF.adjust_brightness(im, f), lambda im, f: TF.adjust_contrast(im, f),
             lambda im, f: TF.adjust_saturation(im, f), lambda im, f: TF.adjust_hue(im, f)]
    mean, std = MEAN_STD["folder"]
    expected = []
    for i in range(16):
        left, top, w, h = (int(v) for v in boxes[i])
        im = TF.resized_crop(images[i].float() / 255, top, left, h, w, [size, size], antialias=True)
        im = TF.horizontal_flip(im) if p["flip"][i] else im
        if p["jitter"][i]:
            for step in p["order"][i].tolist():
                im = steps[step](im, float(p["factors"][i, step]))
        im = TF.rgb_to_grayscale(im, num_output_channels=3) if p["gray"][i] else im
        im = TF.gaussian_blur(im, [view.kernel_size] * 2, [float(p["sigma"][i])] * 2) if p["blur"][i] else im
        im = TF.solarize(im, 128 / 255) if p["solarize"][i] else im
        expected.append(TF.normalize(im, mean, std))
    torch.testing.assert_close(view.apply(images, p), torch.stack(expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize("group", [8, 2])
def test_images_of_different_sizes_are_cropped_each_at_its_own_size(group, monkeypatch):
    """A list of images of any sizes (a batch of decoded files) gets the views each image would get alone at the
    same parameters, resized a group of zero-padded cut-outs at a time (one group, or groups of 2, 2 and 1); each
    box follows the rule at that image's size."""
    monkeypatch.setattr("common.batched.CUT_OUTS_A_GROUP", group)
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 30), (32, 32), (17, 60), (60, 17), (32, 32)]  # the last two: the fallback's narrow and wide cases
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    view = BatchedView(24, "folder", **PRESETS["asym"][0], scale=(0.9, 1.0))
    p = view.sample(len(images), torch.Generator().manual_seed(5))
    heights, widths = (torch.tensor(side) for side in zip(*sizes))
    boxes = boxes_of(p, heights, widths, view.ratio)
    made = view.apply(images, p)
    for i, (h, w) in enumerate(sizes):
        one = {name: value[i:i + 1] for name, value in p.items()}
        assert torch.equal(boxes[i:i + 1], boxes_of(one, h, w, view.ratio))
        torch.testing.assert_close(made[i:i + 1], view.apply(images[i][None], one), atol=1e-5, rtol=0)
    assert (boxes[:, 0] + boxes[:, 2] <= widths).all() and (boxes[:, 1] + boxes[:, 3] <= heights).all()
    same, rows = [images[1], images[4]], {name: value[[1, 4]] for name, value in p.items()}
    torch.testing.assert_close(view.apply(same, rows), made[[1, 4]], atol=1e-5, rtol=0)  # one size: one tensor


def test_views_come_from_the_generator_alone():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    view = BatchedView(32, "cifar10", **PRESETS["sym"][0])
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    first = view(images, generator)
    torch.manual_seed(123)  # the global RNG plays no part
    generator.set_state(state)
    assert torch.equal(view(images, generator), first)
    assert not torch.equal(view(images, generator), first)  # the generator moved on
    assert first.shape == (4, 3, 32, 32) and first.dtype == torch.float32


def _jitter_and_blur(transform):
    """The ColorJitter ranges, and the GaussianBlur's kernel and p (0, 0 without one), of an augment.view()."""
    steps = [(t, getattr(step, "p", 1.0)) for step in transform.transforms for t in getattr(step, "transforms", [step])]
    jitter = next(t for t, _ in steps if isinstance(t, T.ColorJitter))
    blur = [(t.kernel_size[0], p) for t, p in steps if isinstance(t, T.GaussianBlur)]
    return [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue], (blur or [(0, 0.0)])[0]


@pytest.mark.parametrize("views", [two_views("asym", 32, "cifar10", scale=(0.2, 1.0)),
                                   multi_crop("sym", "stl10", 96, 48, 3),
                                   two_views("asym", 32, "cifar10", jitter=[0.4, 0.4, 0.4, 0.1], small_image_blur=True),
                                   multi_crop("sym", "cifar10", 32, 18, 2, jitter=[0.5, 0.3, 0.2, 0.05],
                                              small_image_blur=True)])
def test_batched_views_are_the_per_image_pipelines_views(views):
    """BatchedViews takes each view's settings from augment's MultiView: the same views, sizes and order, the
    same jitter ranges (the jitter key's, in every view), the same blur kernel and p (small_image_blur's too)."""
    batched = BatchedViews(views)
    image = torch.randint(0, 256, (3, 100, 100), dtype=torch.uint8)
    per_image = views(TF.to_pil_image(image))
    made = batched(image[None].expand(5, -1, -1, -1), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in made] == [(5, *v.shape) for v in per_image]
    for settings, view, transform in zip(views.settings, batched.views, views.transforms):
        assert (view.size, view.scale, view.solarize) == (settings["size"], settings["scale"], settings["solarize"])
        assert view.blur == (settings["blur"] if settings["size"] >= 96 or settings["small_image_blur"] else 0.0)
        jitter, (kernel_size, blur) = _jitter_and_blur(transform)
        assert [v for r in view.jitter for v in r] == pytest.approx([v for r in jitter for v in r])
        assert (view.kernel_size if view.blur else 0, view.blur) == (kernel_size, blur)


@pytest.mark.quick
def test_small_image_blur_and_jitter_change_nothing_else():
    """Off (the default), a 32-px view has no blur in either path; on, it keeps its preset's blur p with 13 taps,
    and the batched path draws the same numbers either way (the blur coin and sigma are drawn for every image
    at any size), so the switch and the jitter key change those steps only."""
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    off, on = two_views("asym", 32, "cifar10"), two_views("asym", 32, "cifar10", small_image_blur=True)
    assert [_jitter_and_blur(t)[1] for t in off.transforms] == [(0, 0.0), (0, 0.0)]
    assert [_jitter_and_blur(t)[1] for t in on.transforms] == [(13, 1.0), (13, 0.1)]
    draws = [view.sample(8, torch.Generator().manual_seed(1)) for view in (BatchedViews(off).views[0],
                                                                           BatchedViews(on).views[0])]
    assert draws[0].keys() == draws[1].keys()
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in draws[0] if k != "blur")
    assert not draws[0]["blur"].any() and draws[1]["blur"].all()  # p 0 and p 1 of the same uniform draws
    made = [BatchedViews(views)(images, torch.Generator().manual_seed(2)) for views in (off, on)]
    assert not torch.allclose(made[0][0], made[1][0])  # view 1 blurs every image when on
    mine = two_views("asym", 32, "cifar10", jitter=[0.4, 0.4, 0.4, 0.1])
    assert [s["jitter"] for s in mine.settings] == [(0.4, 0.4, 0.4, 0.1)] * 2
    assert [_jitter_and_blur(t)[0][2] for t in mine.transforms] == [pytest.approx((0.6, 1.4))] * 2  # not 0.2
    assert [view.jitter[2] for view in BatchedViews(mine).views] == [pytest.approx((0.6, 1.4))] * 2
    assert all(s | dict(jitter=p["jitter"]) == p for s, p in zip(mine.settings, off.settings))  # nothing else


def _loader_cfg(**changes):
    return SimpleNamespace(**{**dict(dataset="synthetic", data_dir="", download=False, image_size=8, subset=70,
                                     seed=3, bad_images="stop", num_workers=0, views="batched"), **changes})


def _jpeg_folder(root, n=70, size=(8, 8)):
    """n noise JPEGs of one size in two class folders (an ImageFolder tree)."""
    g = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:03d}.jpg")
    return root


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_batched_loader_gives_the_same_global_batches_on_any_number_of_ranks(source, tmp_path):
    """The views of global batch b, and its images' labels, are the same for 2 ranks x 16 and 1 rank x 32, and a
    mid-epoch resume (set_epoch with skip) gives exactly the rest of the epoch: DDP equivalence and exact resume
    need no generator state. An image folder's files are decoded a batch at a time (DecodingLoader), with a
    loader worker on one rank."""
    views = two_views("sym", 8, "synthetic")
    changes = dict(dataset="folder", data_dir=str(_jpeg_folder(tmp_path))) if source == "folder" else {}

    def batches(batch_size, world_size, epoch, done=0):
        per_rank = []
        for rank in range(world_size):
            cfg = _loader_cfg(batch_size=batch_size, num_workers=int(source == "folder" and rank == 1), **changes)
            loader = pretrain_loader(cfg, views, rank, world_size, torch.device("cpu"))
            assert isinstance(loader, DecodingLoader if source == "folder" else BatchedLoader)
            loader.sampler.set_epoch(epoch, skip=done * batch_size)
            per_rank.append(list(loader))
            assert len(loader) == len(per_rank[-1])
        # rank r's row j is row r + W j of the global batch
        return [([torch.stack([made[v] for made, _ in step], 1).flatten(0, 1) for v in range(2)],
                 torch.stack([labels for _, labels in step], 1).flatten()) for step in zip(*per_rank)]

    for epoch in (0, 5):
        one, two = batches(32, 1, epoch), batches(16, 2, epoch)
        assert len(one) == len(two) == 70 // 32
        for (views_one, labels_one), (views_two, labels_two) in zip(one, two):
            assert torch.equal(labels_one, labels_two)
            for a, b in zip(views_one, views_two):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    rest = batches(32, 1, 5, done=1)
    assert len(rest) == 1 and all(torch.equal(a, b) for a, b in zip(rest[0][0], batches(32, 1, 5)[1][0]))
    assert not torch.equal(batches(32, 1, 0)[0][0][0], batches(32, 1, 1)[0][0][0])  # new views every epoch
    first = batches(32, 1, 0)[0][0]
    assert not torch.equal(first[0], first[1])  # the two views of an image differ


def test_a_data_set_too_large_for_the_gpu_stays_on_the_host_and_goes_there_a_batch_at_a_time(monkeypatch):
    """Above a quarter of the GPU's memory the images stay in (pageable) host memory, not pinned whole on every
    rank; each batch is gathered on the host and copied by to_device (pinned, non-blocking), its labels too.
    A CPU plays the GPU here: its memory is said to be tiny, and to_device records instead of pinning."""
    import common.batched as batched
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=1000))
    copied = []
    monkeypatch.setattr(batched, "to_device", lambda x, device: copied.append((tuple(x.shape), device)) or x)
    cfg, gpu = _loader_cfg(batch_size=8), torch.device("cuda", 0)
    loader = batched.batched_loader(pretrain_loader(cfg, two_views("sym", 8, "synthetic"), 0, 1,
                                                    torch.device("cpu")).images, two_views("sym", 8, "synthetic"),
                                    cfg, 0, 1, gpu)
    assert not loader.pixels.is_pinned() and loader.pixels.device.type == "cpu"
    loader.sampler.set_epoch(0)
    next(iter(loader))
    assert copied[0] == ((8, 3, 8, 8), gpu) and copied[-1] == ((8,), gpu)  # the batch's images first, labels last


def test_a_folders_batches_decoded_on_the_device_are_the_in_memory_batches(tmp_path):
    """For images of one size, decoding each batch's files (DecodingLoader, what a GPU does with nvJPEG) gives
    the views and labels of holding the decoded images in memory (BatchedLoader): the same batches, the same
    parameters, the same pixels (torchvision's and PIL's CPU JPEG decoders agree)."""
    cfg = _loader_cfg(dataset="folder", data_dir=str(_jpeg_folder(tmp_path, 20, (12, 10))), batch_size=8)
    views = multi_crop("sym", "folder", 8, 4, 2)
    decoding = pretrain_loader(cfg, views, 0, 1, torch.device("cpu"))
    images, labels = as_uint8(decoding.images)
    in_memory = BatchedLoader(images, labels, views, 8, 0, 1, cfg.seed, torch.device("cpu"))
    for loader in (decoding, in_memory):
        loader.sampler.set_epoch(2)
    for (made, labels), (expected, expected_labels) in zip(decoding, in_memory):
        assert torch.equal(labels, expected_labels) and [v.shape[-1] for v in made] == [8, 8, 4, 4]
        for a, b in zip(made, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_folder_of_any_sizes_and_formats_and_its_bad_files(tmp_path, capsys):
    """DecodingLoader takes images of any sizes, JPEG or not; a file the JPEG decoder rejects goes to PIL, so the
    folder's bad_images rule names it (stop) or replaces it by the next image (skip)."""
    g = np.random.default_rng(1)
    for i, (h, w) in enumerate([(32, 32), (20, 44), (50, 30), (32, 32), (9, 70), (64, 48)]):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"c{i % 2}" / (f"{i}.png" if i == 2 else f"{i}.jpg"))
    (tmp_path / "c1" / "5.jpg").write_bytes(b"\xff\xd8" + bytes(100))  # a JPEG's marker, then nothing usable
    cfg = _loader_cfg(dataset="folder", data_dir=str(tmp_path), subset=0, batch_size=6, bad_images="skip")
    loader = pretrain_loader(cfg, two_views("sym", 16, "folder"), 0, 1, torch.device("cpu"))
    loader.sampler.set_epoch(0)
    (made, labels), = list(loader)
    assert [tuple(v.shape) for v in made] == [(6, 3, 16, 16)] * 2 and all(v.isfinite().all() for v in made)
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1]  # 5.jpg replaced by the next image, 0.jpg (class 0)
    assert "unreadable image" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"cannot read image .*5\.jpg"):
        loader = pretrain_loader(_loader_cfg(**{**vars(cfg), "bad_images": "stop"}), two_views("sym", 16, "folder"),
                                 0, 1, torch.device("cpu"))
        loader.sampler.set_epoch(0)
        list(loader)


class _ArrayData(torch.utils.data.Dataset):
    """A reader that keeps its images as one array, as torchvision's CIFAR (N, H, W, 3) and STL-10 (N, 3, H, W)."""

    def __init__(self, channels_last):
        self.pixels = torch.randint(0, 256, (12, 3, 10, 14), dtype=torch.uint8, generator=torch.Generator())
        self.data = (self.pixels.permute(0, 2, 3, 1) if channels_last else self.pixels).numpy()
        self.targets = list(range(12))

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return TF.to_pil_image(self.pixels[i]), self.targets[i]


@pytest.mark.parametrize("channels_last", [True, False])
def test_images_are_read_into_memory_from_the_readers_arrays_or_decoded(channels_last):
    data = _ArrayData(channels_last)
    images, labels = as_uint8(data)
    assert torch.equal(images, data.pixels) and labels.tolist() == list(range(12))
    part = torch.utils.data.Subset(data, [7, 2, 5])
    images, labels = as_uint8(part)
    assert torch.equal(images, data.pixels[[7, 2, 5]]) and labels.tolist() == [7, 2, 5]
    data.data = None  # no array: each image decoded once
    images, labels = as_uint8(part)
    assert torch.equal(images, data.pixels[[7, 2, 5]]) and labels.tolist() == [7, 2, 5]


def test_views_choice_and_one_image_size_in_memory(tmp_path):
    """`views: auto` is batched for the readers that hold images in memory and workers for folders; images held
    in memory as one array need one size, a clear error otherwise."""
    _jpeg_folder(tmp_path, 4)
    cfg = _loader_cfg(dataset="folder", data_dir=str(tmp_path), subset=0, batch_size=2, views="auto")
    assert isinstance(pretrain_loader(cfg, two_views("sym", 8, "folder"), 0, 1, torch.device("cpu")),
                      torch.utils.data.DataLoader)
    mixed = [(TF.to_pil_image(torch.zeros(3, h, 8, dtype=torch.uint8)), 0) for h in (8, 8, 9)]
    with pytest.raises(UsageError, match=r"needs one image size; found .*use --views workers"):
        as_uint8(mixed)
    with pytest.raises(UsageError, match="views must be auto, batched, workers, got 'gpu'"):
        pretrain_loader(_loader_cfg(views="gpu", batch_size=2), two_views("sym", 8, "synthetic"), 0, 1,
                        torch.device("cpu"))
