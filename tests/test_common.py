"""common/: config parsing, backbones, datasets, views and the kNN classifier."""
import dataclasses
import json
import importlib
import re
import sys
from types import SimpleNamespace
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torchvision.datasets as tvd
import torchvision.models as tvm
from PIL import Image
from torch.utils.data import DataLoader

from battery import quick_args, run_ranks
from helpers import METHODS, REPO, RunConfig, assert_ok, assert_one_line_error, fake_cpu, run_script

from common import MIN_TORCH, MIN_TORCHVISION
from common.augment import eval_transform, multi_crop, two_views
from common.backbones import ARCHS, RESNETS, apply_cifar_stem, backbone_args, build_backbone
from common.checkpoints import check_schedule, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from common.config import ConfigError, PretrainConfig, UsageError, load_config, usage
from common.data import EpochSampler, SeededViews, Synthetic, build_dataset, labels_of, subset
from common.knn import knn_predict, topk_correct
from common.loaders import pretrain_loader
from common.precision import resolve_precision
from common.probe import OnlineProbe
from common.run_folder import changed_settings
from common.step_metrics import StepMetrics


@dataclass
class Demo:
    lr: float = 0.1  # learning rate
    epochs: int = 10  # how long
    name: str = "x"  # a name
    flag: bool = False  # a switch
    scale: tuple[float, float] = (0.08, 1.0)  # crop scale


# ---- config ----
def test_config_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nepochs: 5\nscale: [0.2, 1]\n")
    cfg = load_config(Demo, ["--config", str(path), "--epochs", "7", "--name=007", "--flag"])
    assert (cfg.lr, cfg.epochs, cfg.name, cfg.flag, cfg.scale) == (1e-4, 7, "007", True, (0.2, 1.0))
    assert load_config(Demo, ["--flag", "false", "--lr", "3"]).flag is False
    assert load_config(Demo, []) == Demo()


def test_config_key_equals_value_as_hydra_style_repositories_take_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\n")
    cfg = load_config(Demo, [f"config={path}", "epochs=7", "name=007", "flag=true", "--lr", "0.5"])
    assert (cfg.lr, cfg.epochs, cfg.name, cfg.flag) == (0.5, 7, "007", True)
    assert load_config(Demo, ["scale=[0.2, 1]"]).scale == (0.2, 1.0)
    assert load_config(Demo, ["--flag", "epochs=3"]) == Demo(flag=True, epochs=3)  # a bare flag, then key=value


@pytest.mark.quick
@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unknown config key 'lrr' on the command line (did you mean 'lr'?). Valid keys: lr, epochs"),
    (["--epochs", "1.5"], "'epochs' expects int, got 1.5"),
    (["--flag", "maybe"], "'flag' expects bool"),
    (["--lr"], "--lr needs a value"),
    (["epochs", "3"], "expected --key value or key=value, got 'epochs'"),
    (["epochs=three"], "'epochs' expects int, got 'three'"),
    (["epoch=3"], "unknown config key 'epoch' on the command line (did you mean 'epochs'?)"),
    (["=3"], "expected --key value or key=value, got '=3'"),
    (["--config", "/nonexistent.yaml"], "cannot read config file /nonexistent.yaml"),
])
def test_config_errors_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(Demo, argv)
    assert message in str(e.value)


@pytest.mark.quick
def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'epoch' in .*bad.yaml \\(did you mean 'epochs'"):
        load_config(Demo, ["--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Demo, ["--config", str(bad)])


def test_usage_lists_every_key_with_its_comment():
    text = usage(Demo, "demo.py")
    assert "--lr" in text and "learning rate" in text and "--scale" in text and "crop scale" in text


@pytest.mark.parametrize("method", METHODS)
def test_help_lists_the_method_first_then_the_shared_settings(method):
    """Each script declares its method's and recipe's fields; the data and run settings are PretrainConfig's, declared
    once (a script only sets its out_dir), and --help lists every key: the script's own first, each with its
    comment."""
    config = importlib.import_module(method).Config
    own = list(vars(config)["__annotations__"])
    shared = [f.name for f in dataclasses.fields(PretrainConfig)]
    assert issubclass(config, PretrainConfig) and set(own) & set(shared) == {"out_dir"}
    keys = re.findall(r"^  --(\w+) +(.*)$", usage(config, f"{method}.py"), flags=re.M)
    assert [k for k, _ in keys] == own + [k for k in shared if k != "out_dir"]
    assert all(len(text.split(None, 1)) == 2 for _, text in keys), "a key without its comment"
    assert dict(keys)["out_dir"].startswith(f"'runs/{method}'")


def test_changed_settings_names_every_change():
    """Resuming reports each changed value, and a key only one side has (a setting renamed or added since the
    checkpoint was written) as a change too, so a run never silently takes a default in place of its value."""
    saved = {"lr": 0.1, "epochs": 10, "name": "x", "scale": (0.08, 1.0), "resume": False, "gone": 1}  # no "flag"
    cfg = Demo(lr=0.2, epochs=10, flag=True)
    assert changed_settings(saved, cfg) == ["lr: 0.1 -> 0.2", "flag: (not in the checkpoint) -> True",
                                            "gone: 1 -> (not a setting of this script)"]


# ---- backbones ----
@pytest.mark.parametrize("arch", sorted(RESNETS))
def test_resnet_trunk_loads_into_torchvision(arch):
    """Users load our trunk into torchvision's model with fc dropped, without renaming keys."""
    for stem in (True, False):
        trunk, width = build_backbone(**backbone_args(arch, 32 if stem else 224, "auto"))
        reference = getattr(tvm, arch)()
        reference.fc = nn.Identity()
        if stem:
            apply_cifar_stem(reference)
        reference.load_state_dict(trunk.state_dict(), strict=True)
        assert width == {"resnet18": 512, "resnet34": 512}.get(arch, 2048)
    if arch == "resnet18":
        assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize("arch, width", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_vit_trunk_loads_into_torchvision(arch, width):
    args = backbone_args(arch, 32, "auto", patch_size=8)
    assert args["cifar_stem"] is False
    trunk, w = build_backbone(**args)
    assert w == width
    reference = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=width // 64,
                                      hidden_dim=width, mlp_dim=4 * width)
    reference.heads = nn.Identity()
    reference.load_state_dict(trunk.state_dict(), strict=True)
    if arch == "vit_tiny":
        assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize("arch, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_starts_every_block_at_the_identity(arch, last_bn):
    """The last BN of each residual block starts at gamma 0 (zero_init_residual), and only when asked."""
    for flag in (False, True):
        trunk, _ = build_backbone(**backbone_args(arch, 224), zero_init_residual=flag)
        gammas = [getattr(block, last_bn).weight for layer in (trunk.layer1, trunk.layer2, trunk.layer3,
                                                                trunk.layer4) for block in layer]
        assert all(bool((g == 0).all()) == flag for g in gammas)
        assert bool((trunk.bn1.weight == 1).all())  # the stem's BN is left alone
    with pytest.raises(UsageError, match="zero_init_residual applies to ResNets only"):
        build_backbone(**backbone_args("vit_tiny", 32, patch_size=8), zero_init_residual=True)


@pytest.mark.quick
def test_backbone_args_resolve_and_reject():
    assert backbone_args("resnet50", 224, "auto")["cifar_stem"] is False
    assert backbone_args("resnet50", 64, "auto")["cifar_stem"] is True
    assert backbone_args("resnet50", 224, "true")["cifar_stem"] is True
    with pytest.raises(UsageError, match="unknown arch 'resnet19'; choose one of"):
        backbone_args("resnet19", 32)
    with pytest.raises(UsageError, match="not a multiple of patch_size"):
        backbone_args("vit_small", 32, patch_size=7)
    with pytest.raises(UsageError, match="cifar_stem must be"):
        backbone_args("resnet18", 32, "yes")
    assert len(ARCHS) == 13  # the ResNets and ViTs by name; any other torchvision model: tests/test_backbones.py


# ---- datasets ----
def test_synthetic_is_deterministic_and_labelled():
    a, b = Synthetic(20, 16), Synthetic(20, 16)
    assert a[3][0].tobytes() == b[3][0].tobytes() and a[3][0].size == (16, 16)
    assert labels_of(a) == [i % 10 for i in range(20)]
    assert len(build_dataset("synthetic", "", "pretrain", image_size=8)) == 1024
    assert len(build_dataset("synthetic", "", "val", image_size=8)) == 256


def _write_images(folder, n):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")


def test_folder_with_classes_and_splits(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            _write_images(tmp_path / split / cls, n)
    train, val = build_dataset("folder", str(tmp_path), "train"), build_dataset("folder", str(tmp_path), "val")
    assert len(train) == 6 and len(val) == 4 and labels_of(val) == [0, 0, 1, 1]
    assert len(build_dataset("folder", str(tmp_path), "pretrain")) == 6


def test_folder_without_classes_is_unlabeled(tmp_path):
    _write_images(tmp_path / "photos", 4)  # images straight in the folder, no class sub-folders
    data = build_dataset("folder", str(tmp_path / "photos"), "pretrain")
    assert len(data) == 4 and data[0][1] == -1 and data[0][0].mode == "RGB"
    with pytest.raises(UsageError, match="val/ sub-folder"):
        build_dataset("folder", str(tmp_path / "photos"), "val")


@pytest.mark.quick
def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="not found in .*nowhere.*--data_dir"):
        build_dataset("folder", str(tmp_path / "nowhere"), "pretrain")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images"):
        build_dataset("folder", str(tmp_path / "empty"), "pretrain")
    with pytest.raises(UsageError, match="cifar10 not found .*--download true"):
        build_dataset("cifar10", str(tmp_path), "pretrain")
    with pytest.raises(UsageError, match="unknown dataset 'imagenet1k'"):
        build_dataset("imagenet1k", str(tmp_path), "pretrain")


@pytest.mark.quick
def test_download_without_a_network_is_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    def no_network(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    with pytest.raises(UsageError) as e:
        build_dataset("cifar10", str(tmp_path), "pretrain", download=True)
    message = str(e.value)
    assert "\n" not in message and "could not download cifar10" in message and "Temporary failure" in message
    assert "download it by hand" in message and "--dataset folder" in message


def test_subset_is_fixed():
    data = Synthetic(100, 8)
    assert subset(data, 0) is data
    a, b = subset(data, 10, seed=1), subset(data, 10, seed=1)
    assert a.indices == b.indices and len(a) == 10 and labels_of(a) == [i % 10 for i in a.indices]


# ---- views ----
def test_views_shapes_and_presets():
    image = Synthetic(1, 40)[0][0]
    for preset in ("sym", "sym_weak", "asym"):
        v1, v2 = two_views(preset, 32, "cifar10")(image)
        assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    crops = multi_crop("asym", "synthetic", 32, 16, num_local=4)(image)
    assert [c.shape[-1] for c in crops] == [32, 32, 16, 16, 16, 16]
    assert eval_transform(224, "folder")(Synthetic(1, 300)[0][0]).shape == (3, 224, 224)
    with pytest.raises(UsageError, match="unknown augmentation preset"):
        two_views("strong", 32, "cifar10")


def test_eval_transform_keeps_small_images_whole():
    """STL-10 (96 px) and CIFAR (32 px) are evaluated on the whole image; only image folders above 64 px take
    the 256/224 resize-then-crop of ImageNet."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (96, 96, 3), generator=g, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    mean, std = torch.tensor([0.4467, 0.4398, 0.4066]), torch.tensor([0.2603, 0.2566, 0.2713])
    whole = (pixels.permute(2, 0, 1) / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(eval_transform(96, "stl10")(image), whole)
    assert eval_transform(32, "cifar10")(Synthetic(1, 32)[0][0]).shape == (3, 32, 32)
    cropped = eval_transform(96, "folder")(image)  # 96 -> 109 px, centre 96: the border is cut
    assert cropped.shape == (3, 96, 96) and not torch.allclose(cropped, whole, atol=0.1)


def test_pretrain_loader_global_batches_do_not_depend_on_ranks():
    """Global batch b is the same images for 2 ranks x 16 and 1 rank x 32 (and in the same epochs), so a run
    resumed on another number of ranks with the same global batch sees what the uninterrupted run saw."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(dataset="synthetic", data_dir="", download=False, image_size=8, subset=70, seed=3,
                          bad_images="stop", num_workers=0, views="workers")  # batched: tests/test_batched.py
    views = two_views("sym", 8, "synthetic")

    def batches(batch_size, world_size, epoch, done=0):
        per_rank = []
        for rank in range(world_size):
            loader = pretrain_loader(SimpleNamespace(**vars(cfg), batch_size=batch_size), views, rank, world_size,
                                     torch.device("cpu"))
            loader.sampler.set_epoch(epoch, skip=done * batch_size)
            per_rank.append(list(loader.batch_sampler))
            assert len(loader) == len(per_rank[-1])
        return [sorted(key for rank in step for key in rank) for step in zip(*per_rank)]

    for epoch in (0, 5):
        one, two = batches(32, 1, epoch), batches(16, 2, epoch)
        assert len(one) == len(two) == 70 // 32 and one == two
        assert all(e == epoch for step in one for e, _ in step)
    assert batches(32, 1, 0) != batches(32, 1, 1)  # a new permutation every epoch
    # a mid-epoch resume after global batch 1, on either split: the rest of the same epoch
    assert batches(16, 2, 5, done=1) == batches(32, 1, 5, done=1) == batches(32, 1, 5)[1:]
    assert batches(16, 2, 5, done=2) == []
    with pytest.raises(UsageError, match="make no full batch of 64 x 2 ranks"):
        pretrain_loader(SimpleNamespace(**vars(cfg), batch_size=64), views, 0, 2, torch.device("cpu"))


def test_blur_only_at_96_px_and_above():
    def has_blur(t):
        return "GaussianBlur" in repr(t)
    assert not has_blur(two_views("sym", 32, "cifar10").transforms[0])
    assert has_blur(two_views("sym", 96, "stl10").transforms[0])
    small = two_views("sym", 32, "cifar10", small_image_blur=True).transforms[0]
    assert "GaussianBlur(kernel_size=(13, 13)" in repr(small)


@pytest.mark.quick
@pytest.mark.parametrize("jitter", [(0.4, 0.4, 0.4), (0.4, -0.1, 0.4, 0.1), (0.4, 0.4, 0.4, 0.6)])
def test_a_bad_jitter_is_a_one_line_usage_error(jitter):
    with pytest.raises(UsageError, match=r"jitter takes 4 strengths .* got \[") as e:
        two_views("sym", 32, "cifar10", jitter=jitter)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="jitter takes 4 strengths"):
        multi_crop("sym", "cifar10", 32, 16, 2, jitter=jitter)


@pytest.mark.quick
def test_moco_jitter_and_small_image_blur_keys(tmp_path):
    """The shared keys parse from YAML (null or a list; a bare --small_image_blur) and reach the views; a bad
    jitter stops a script with one line, before its run folder is written."""
    assert load_config(PretrainConfig, ["--jitter", "null"]).jitter is None
    cfg = load_config(PretrainConfig, ["--small_image_blur", "jitter=[0.4, 0.4, 0.4, 0.1]"])
    assert cfg.small_image_blur is True and cfg.jitter == (0.4, 0.4, 0.4, 0.1)
    with pytest.raises(ConfigError, match="config key 'jitter' expects"):
        load_config(PretrainConfig, ["--jitter", "strong"])
    result = run_script(quick_args("moco", tmp_path / "a", "--jitter", "[0.4, 0.4]", epochs=1))
    assert_one_line_error(result, "jitter takes 4 strengths (brightness, contrast, saturation, hue)")
    assert not (tmp_path / "a" / "config.json").exists()


def test_seeded_views_do_not_depend_on_workers():
    data = SeededViews(Synthetic(16, 32), two_views("sym", 32, "synthetic"), seed=3)
    assert torch.equal(data[(1, 5)][0][0], data[(1, 5)][0][0])
    assert not torch.equal(data[(1, 5)][0][0], data[(2, 5)][0][0])  # a new epoch, new views
    from torch.utils.data import DistributedSampler
    batches = []
    for workers in (0, 2):
        sampler = EpochSampler(DistributedSampler(data, 1, 0, seed=0))
        sampler.set_epoch(4)
        loader = DataLoader(data, batch_size=8, sampler=sampler, num_workers=workers)
        batches.append(torch.cat([views[0] for views, _ in loader]))
    assert torch.equal(*batches)


# ---- kNN and checkpoints ----
def test_knn_predict_matches_a_direct_vote():
    g = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g), \
        torch.randn(5, 8, generator=g)
    k, t = 7, 0.1
    scores = knn_predict(bank, labels, queries, 3, k=k, temperature=t, chunk=2)
    for q, row in zip(queries, scores):
        sims = torch.nn.functional.cosine_similarity(q[None], bank)
        expected = torch.zeros(3)
        for i in sims.argsort(descending=True)[:k]:
            expected[labels[i]] += torch.exp(sims[i] / t)
        torch.testing.assert_close(row, expected)
    assert topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), torch.tensor([1, 2]), (1, 2)) == [1, 2]


@pytest.mark.quick
def test_checkpoint_roundtrip_and_corruption(tmp_path):
    torch.manual_seed(5)
    states = rng_states(torch.device("cpu"))
    expected = torch.rand(3)
    save_checkpoint({"rng": states, "w": torch.ones(2)}, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")  # weights_only=True: plain tensors and Python values
    set_rng_states(loaded["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert not (tmp_path / "c.pt.tmp").exists()
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_cudnn_picks_its_fastest_algorithms_on_a_gpu(monkeypatch):
    """The inputs keep their sizes from step to step: cuDNN's benchmark mode (as the official repositories)."""
    from common.distributed import init_distributed
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert init_distributed()[2].type == "cuda" and torch.backends.cudnn.benchmark


def test_rng_restores_this_ranks_gpu_only(monkeypatch):
    """One CUDA state, this rank's device's (one per visible GPU would not load where fewer are visible)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    states = rng_states(torch.device("cpu"))
    assert states["cuda"] is None
    set_rng_states(states, torch.device("cuda", 1))
    assert calls == []
    set_rng_states(dict(states, cuda=torch.ones(4, dtype=torch.uint8)), torch.device("cuda", 0))
    assert [(int(state[0]), d) for state, d in calls] == [(1, torch.device("cuda", 0))]


@pytest.mark.quick
def test_below_the_torch_floor_a_script_stops_in_one_line():
    for package, version in (("torch", "2.5.1+cu124"), ("torchvision", "0.20.1")):
        older = (f"import {package}, runpy, sys; {package}.__version__ = {version!r}; sys.argv = ['simclr.py']; "
                 "runpy.run_path('simclr.py', run_name='__main__')")
        assert_one_line_error(run_script(["-c", older]), f"this code needs {package} >= ")
    requirements = (REPO / "requirements.txt").read_text().split()
    assert f"torch>={MIN_TORCH}" in requirements and f"torchvision>={MIN_TORCHVISION}" in requirements


@pytest.mark.quick
@pytest.mark.parametrize("cpu, expected", [
    (dict(capability="AVX2"), ("fp32", "AVX2 without AVX512-BF16 or AMX")),  # older EPYC / Ryzen, most laptops
    (dict(capability="AVX512"), ("fp32", "AVX512 without AVX512-BF16 or AMX")),  # Skylake-SP, Cascade Lake
    (dict(capability="AVX512", avx512_bf16=True), ("bf16", "AVX512 with AVX512-BF16")),  # Cooper Lake, Zen 4
    (dict(capability="AVX512", avx512_bf16=True, amx=True), ("bf16", "AVX512 with AMX")),  # Sapphire Rapids
    (dict(machine="aarch64", capability="SVE256", arm_bf16=True), ("bf16", "ARM SVE256, with BF16 instructions")),
    (dict(machine="arm64", capability="DEFAULT"), ("fp32", "ARM DEFAULT, without BF16 instructions")),  # Apple M1
])
def test_precision_auto_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, capsys, cpu, expected):
    fake_cpu(monkeypatch, **cpu)
    precision, reason = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected[0] and expected[1] in reason and reason.startswith("auto: ")
    out, err = capsys.readouterr()
    assert out == f"precision: {precision} ({reason})\n" and err == ""  # printed once, by the main process
    resolve_precision("auto", torch.device("cpu"), is_main=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.quick
def test_precision_bf16_forced_on_a_cpu_without_it_runs_with_a_warning(monkeypatch, capsys):
    fake_cpu(monkeypatch, capability="AVX2")
    assert resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: precision bf16") and "emulated" in err[0]
    fake_cpu(monkeypatch, capability="AVX512", avx512_bf16=True)
    assert resolve_precision("bf16", torch.device("cpu")) == ("bf16", "asked for: this CPU (AVX512 with "
                                                                      "AVX512-BF16) computes bf16 natively")
    assert resolve_precision("fp32", torch.device("cpu"))[0] == "fp32" and capsys.readouterr().err == ""


@pytest.mark.quick
def test_precision_auto_on_a_gpu_and_bad_values(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision("auto", gpu)[0] == "bf16"  # native bf16 (A100, H100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", gpu)[0] == "fp16"  # emulated only (V100, T4): fp16 with a GradScaler
    assert resolve_precision("fp16", gpu)[0] == "fp16" and resolve_precision("bf16", gpu)[0] == "bf16"
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="precision must be one of auto, bf16, fp16, fp32, got 'half'"):
        resolve_precision("half", cpu)


def test_step_metrics_average_and_stop_at_the_first_non_finite_loss(tmp_path):
    metrics = StepMetrics(str(tmp_path))
    for loss in (1.0, 2.0, 3.0):
        metrics.add(loss=torch.tensor(loss), z_std=torch.tensor(loss / 10))
    assert metrics.read(step=3) == {"train/loss": 2.0, "train/z_std": pytest.approx(0.2)}
    metrics.add(loss=torch.tensor(5.0), z_std=torch.tensor(0.0))
    assert metrics.read_epoch(step=4) == {"train/epoch_loss": 2.75, "train/epoch_z_std": pytest.approx(0.15)}
    assert metrics.read(step=4) == {}
    for loss in (1.0, float("nan"), float("inf")):
        metrics.add(loss=torch.tensor(loss))
    with pytest.raises(SystemExit, match=r"error: step 12 was not finite \(loss nan; last finite loss 1\); stopped "
                                         "without writing a checkpoint"):
        metrics.read(step=13)  # steps 11, 12, 13, counted as in metrics.jsonl


def test_schedule_check_allows_another_split_of_the_same_global_batch():
    saved = {"world_size": 4, "global_batch": 256, "steps_per_epoch": 195, "total_steps": 1950, "peak_lr": 0.4}
    check_schedule(saved, dict(saved, world_size=2), "last.pt")  # 2 x 128 continues 4 x 64
    with pytest.raises(UsageError, match=r"global batch of 256 \(4 ranks x 64\); this run's is 512 \(8 x 64\).*"
                                         r"--batch_size 32 on 8 ranks"):
        check_schedule(saved, dict(saved, world_size=8, global_batch=512), "last.pt")
    with pytest.raises(UsageError, match="195 steps per epoch; this run's data give 97"):
        check_schedule(saved, dict(saved, steps_per_epoch=97), "last.pt")


def _sharded_knn(rank, world_size, bank, labels, queries, k):
    shard = slice(rank, None, world_size)  # rank r holds bank items r, r + W, ... (as extract_features shards)
    return knn_predict(bank[shard], labels[shard], queries, 4, k=k, temperature=0.1, chunk=3, sharded=True)


@pytest.mark.parametrize("k", [5, 30])
def test_knn_on_a_sharded_bank_equals_the_whole_bank(k):
    """Each rank keeps 1/W of the bank; merging the ranks' k nearest gives the whole bank's vote. k 30 is more
    than a shard's 21 or 20 items: the shards pad, and k is capped at the whole bank's 41."""
    g = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(41, 6, generator=g), torch.randint(0, 4, (41,), generator=g)
    queries = torch.randn(7, 6, generator=g)
    whole = knn_predict(bank, labels, queries, 4, k=k, temperature=0.1)
    for scores in run_ranks(_sharded_knn, 2, bank, labels, queries, k):
        torch.testing.assert_close(scores, whole)


def test_resumed_optimizer_keeps_this_runs_settings():
    """torch's load_state_dict would replace every group's settings with the saved ones: a resumed run with a
    new --weight_decay would silently keep the old one, and groups saved without lr_ratio would break set_lr.
    The state (momentum buffers) comes from the checkpoint; the settings stay this run's."""
    from common.checkpoints import load_state
    weight = nn.Parameter(torch.ones(2, 2))
    weight.grad = torch.ones(2, 2)
    saved = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=0.5)
    saved.step()
    optimizer = torch.optim.SGD([{"params": [weight], "lr_ratio": 0.5}], lr=0.1, momentum=0.9, weight_decay=0.01)
    load_state(optimizer, saved.state_dict(), "last.pt")
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["lr_ratio"]) == (0.01, 0.5)
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], saved.state[weight]["momentum_buffer"])
    bias = nn.Parameter(torch.zeros(2))
    two_groups = torch.optim.SGD([{"params": [weight]}, {"params": [bias]}], lr=0.1)  # one group saved, two built
    with pytest.raises(UsageError, match="holds 1 optimizer parameter groups where this script builds 2: it was "
                                         "written by another version"):
        load_state(two_groups, saved.state_dict(), "last.pt")


@pytest.mark.quick
@pytest.mark.parametrize("key, value, message", [
    ("log_every", 0, "log_every must be at least 1, got 0"),
    ("snapshot_every", 0, "snapshot_every must be at least 1, got 0"),
    ("epochs", -1, "epochs must be at least 1, got -1"),
    ("knn_every", -2, "knn_every must not be negative, got -2"),
    ("probe_every", -1, "probe_every must not be negative, got -1"),
    ("probe_lr", 0, "probe_lr must be positive, got 0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be at least 1, got 0"),
    ("checkpoint_every_steps", -1, "checkpoint_every_steps must not be negative, got -1"),
    ("stop_timeout", 0, "stop_timeout must be a positive number of seconds, got 0"),
])
def test_run_settings_are_checked_before_anything_runs(tmp_path, key, value, message):
    from common.run_folder import check_run
    with pytest.raises(UsageError, match=message):
        check_run(RunConfig(out_dir=str(tmp_path / "run"), **{key: value}))
    assert not (tmp_path / "run").exists()
    check_run(RunConfig(out_dir=str(tmp_path / "run")))  # a new run: nothing created yet
    assert not (tmp_path / "run").exists()


@pytest.mark.quick
def test_knn_monitor_checks_its_splits_when_it_is_made(tmp_path):
    """A folder of images without class sub-folders can be pre-trained on, but the kNN monitor needs labels:
    the monitor says so when it is made, at start-up (the battery runs the train/-without-val/ case)."""
    from types import SimpleNamespace
    from common.knn import KnnMonitor
    _write_images(tmp_path / "photos", 4)
    cfg = SimpleNamespace(knn_every=1, dataset="folder", data_dir=str(tmp_path / "photos"), download=False,
                          image_size=8, bad_images="stop")
    with pytest.raises(UsageError, match="the train split of folder .* is empty or unlabelled; kNN and the "
                                         "linear probe need labels"):
        KnnMonitor(cfg, 0, 1, torch.device("cpu"), "fp32")
    off = SimpleNamespace(**{**vars(cfg), "knn_every": 0})
    assert KnnMonitor(off, 0, 1, torch.device("cpu"), "fp32").splits is None  # off: nothing built


# ---- the online linear probe (common/probe.py); the battery runs it in every method ----
def _probe(arch, rank=0, world_size=1, probe_every=1, data_dir="data", dataset="synthetic"):
    """A probe on an `arch` trunk at 16 px over the synthetic data set, and the trunk (in training mode)."""
    cfg = SimpleNamespace(probe_every=probe_every, dataset=dataset, data_dir=data_dir, download=False, image_size=16,
                          bad_images="stop", seed=0, batch_size=8, num_workers=0, epochs=2)
    model = nn.Module()
    model.backbone_args = backbone_args(arch, 16, patch_size=8)
    torch.manual_seed(0)
    model.backbone, _ = build_backbone(**model.backbone_args)
    images = build_dataset(dataset, data_dir, "pretrain", image_size=16)
    return OnlineProbe(cfg, model, images, rank, world_size, torch.device("cpu"), "fp32"), model.backbone


def _probe_steps(rank, world_size):
    """Three probe steps on this rank's share of two views of 16 images (ViT: no batch statistics, so a trunk's
    features do not depend on how the batch is split); returns the head's weights and momentum."""
    probe, trunk = _probe("vit_tiny", rank, world_size)
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 10
    labels[:5] = -1  # unlabelled images, all in rank 0's half: the ranks' labelled counts differ
    share = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
    for lr in (0.5, 0.3, 0.1):
        trunk(images[share])  # view 1
        trunk(images[share].flip(3))  # view 2
        logged = probe.step(labels[share], lr)
    return {"logged": torch.stack(list(logged.values())),
            "state": probe.head.state_dict(),  # weights and the running statistics of the global batch
            "momentum": [probe.optimizer.state[p]["momentum_buffer"] for p in probe.head.parameters()]}


def test_online_probe_learns_from_the_global_batch():
    """Two gloo ranks, each with half the batch, train the probe exactly as one process with all of it: its
    gradient, its logged loss and accuracy, and its feature statistics are those of the global batch, also when
    the ranks hold different numbers of labelled images."""
    whole = _probe_steps(0, 1)
    for rank in run_ranks(_probe_steps, 2):
        torch.testing.assert_close(rank["logged"], whole["logged"])
        assert rank["state"].keys() == whole["state"].keys() == {"0.running_mean", "0.running_var", "1.weight",
                                                                  "1.bias"}
        for name, value in whole["state"].items():
            torch.testing.assert_close(rank["state"][name], value)
        for a, b in zip(rank["momentum"], whole["momentum"], strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.quick
def test_online_probe_learns_from_the_global_views_only_and_skips_a_non_finite_step(tmp_path):
    """The hook keeps the training forwards of image_size inputs (not multi-crop's small crops, not an
    evaluation's forwards), detached; the probe learns at one lr whatever the features' scale; a step on
    non-finite features leaves weights, statistics and momentum as they were; off, nothing is built or hooked."""
    probe, trunk = _probe("resnet18")
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, -1])  # -1: an unlabelled image, left out
    trunk(x), trunk(torch.randn(4, 3, 8, 8))  # a global view, a small crop
    trunk.eval()
    trunk(x)
    trunk.train()
    assert len(probe.features) == 1 and probe.features[0].shape == (4, 512) and not probe.features[0].requires_grad
    probe.step(labels, 0.1)
    assert not probe.features
    # two views of 64 images of 10 classes, features of a ResNet's scale (norms about 60): at lr 0.1 the probe
    # learns without blowing up, as its BN standardises them (without it the loss passes 1000)
    generator, images = torch.Generator().manual_seed(0), torch.arange(64) % 10
    centres, losses = torch.randn(10, 512, generator=generator), []
    for _ in range(20):
        probe.features = [(centres[images.repeat(2)] + 3 * torch.randn(128, 512, generator=generator)).relu() * 5]
        losses.append(float(probe.step(images, 0.1)["probe_loss"]))
    assert max(losses) < 5 and losses[-1] < 0.5 * losses[0]
    state = [*probe.head.state_dict().values(), *(probe.optimizer.state[p]["momentum_buffer"]
                                                  for p in probe.head.parameters())]
    before = [t.clone() for t in state]
    probe.features = [torch.full((4, 512), float("nan"))]
    assert not torch.isfinite(probe.step(labels, 0.1)["probe_loss"])
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    fresh, trunk = _probe("resnet18")  # a non-finite first step (no momentum yet): as if it had not been
    weights = [t.clone() for t in fresh.head.state_dict().values()]
    fresh.features = [torch.full((4, 512), float("nan"))]
    fresh.step(labels, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.head.state_dict().values(), weights, strict=True))
    assert all(not s["momentum_buffer"].any() for s in fresh.optimizer.state.values())
    off, trunk = _probe("resnet18", probe_every=0)
    trunk(x)
    assert off.step(labels, 0.1) == {} and off.state_dict() == {} and not trunk._forward_hooks


class _Log:
    def __init__(self):
        self.lines = []

    def write(self, **values):
        self.lines.append(values)


@pytest.mark.quick
def test_the_probe_and_the_knn_monitor_check_after_the_last_epoch_too():
    """probe_every 5 / knn_every 3 in a run of 2 epochs: no check after epoch 1, one after epoch 2, the last."""
    from common.knn import KnnMonitor
    probe, trunk = _probe("resnet18", probe_every=5)
    cfg = SimpleNamespace(**{**vars(probe.cfg), "knn_every": 3, "knn_k": 5, "knn_temperature": 0.1})
    knn, log = KnnMonitor(cfg, 0, 1, torch.device("cpu"), "fp32"), _Log()
    tiny = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a fast stand-in trunk for the kNN check
    for epoch in (1, 2):
        probe.after_epoch(epoch, 4 * epoch, log)
        knn.after_epoch(epoch, 4 * epoch, tiny, log)
    checks = [(line["epoch"], sorted(k for k in line if k.startswith("eval/"))) for line in log.lines]
    assert checks == [(2, ["eval/probe_top1", "eval/probe_top5"]), (2, ["eval/knn_top1", "eval/knn_top5"])]


@pytest.mark.quick
def test_online_probe_resumes_or_starts_anew(tmp_path, capsys):
    """A checkpoint's probe is loaded exactly; one of another class count (another data set under resume: true),
    or none (a run without the probe), leaves a new probe and says so: the trunk resumes either way."""
    probe, trunk = _probe("resnet18")
    trunk(torch.randn(4, 3, 16, 16))
    probe.step(torch.tensor([0, 1, 2, 3]), 0.1)
    other, _ = _probe("resnet18")
    other.load_state_dict(probe.state_dict(), "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.head.state_dict().values(), probe.head.state_dict().values()))
    state = probe.state_dict()
    state["head"] = {**state["head"], "1.weight": torch.zeros(100, 512), "1.bias": torch.zeros(100)}
    new, _ = _probe("resnet18")
    before = [t.clone() for t in new.head.state_dict().values()]
    new.load_state_dict(state, "last.pt")
    new.load_state_dict({}, "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(new.head.state_dict().values(), before))
    out = capsys.readouterr().out
    assert "last.pt holds an online probe of 100 classes on 512 features; this run's has 10 on 512: a new probe" in out
    assert "last.pt holds no online probe (probe_every was 0): a new probe starts here" in out


@pytest.mark.quick
def test_online_probe_needs_labels(tmp_path):
    """Pre-training images without classes (a flat folder) and the probe on: one line at start-up."""
    _write_images(tmp_path / "photos" / "train", 4)
    _write_images(tmp_path / "photos" / "val", 4)
    with pytest.raises(UsageError, match="the online probe needs class labels, and the pre-training images of "
                                         "folder .* have none; .* or set --probe_every 0"):
        _probe("resnet18", data_dir=str(tmp_path / "photos"), dataset="folder")


# ---- logging sinks: metrics.jsonl stays the record; --logger also sends every value ----
def test_logger_tensorboard_gets_every_logged_value_at_its_step(tmp_path):
    """A SimCLR run with --logger tensorboard: out_dir/tensorboard's event files hold every numeric value of
    metrics.jsonl at its step (the per-step lines and the epoch's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert_ok(run_script(quick_args("simclr", run, "--logger", "tensorboard", "--log_every", "2", epochs=1)))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [line for line in map(json.loads, open(run / "metrics.jsonl")) if "step" in line and "event" not in line]
    for name in ("train/loss", "train/lr", "train/epoch_loss"):
        expected = [(line["step"], line[name]) for line in logged if name in line]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert expected and [s for s, _ in got] == [s for s, _ in expected], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), name


def test_logger_wandb_is_one_run_per_run_folder(tmp_path, monkeypatch):
    """--logger wandb (a stand-in module: the real one runs offline with WANDB_MODE=offline): one wandb run per run
    folder, the same id when it resumes, the run's config.json as its config, every numeric value at its step."""
    import types

    from common.run_folder import MetricLog
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.4}))
    for _ in range(2):  # a run, then its resume
        log = MetricLog(str(tmp_path), is_main=True, logger="wandb")
        log.write(step=10, epoch=1, **{"train/loss": 1.5, "train/lr": 0.1, "note": "text"})
        log.report_paths()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["dir"] == str(tmp_path) and inits[0]["config"] == {"lr": 0.4}
    assert [c for c in calls if c[0] == "log"][0] == ("log", {"train/loss": 1.5, "train/lr": 0.1}, 10)
    assert MetricLog(str(tmp_path), is_main=False, logger="wandb").logger == "none"  # the main rank only


@pytest.mark.quick
def test_logger_errors_are_one_line(tmp_path, monkeypatch):
    from common.run_folder import check_logger
    assert_one_line_error(run_script(quick_args("simclr", tmp_path / "a", "--logger", "mlflow", epochs=1)),
                          "logger must be one of none, tensorboard, wandb, got 'mlflow'")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as where the package is missing
    with pytest.raises(UsageError, match="--logger wandb needs the wandb package: pip install wandb"):
        check_logger("wandb")
