"""common/: config parsing, backbones, datasets, views and the kNN classifier."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from PIL import Image
from torch.utils.data import DataLoader

from common.augment import eval_transform, multi_crop, two_views
from common.backbones import ARCHS, RESNETS, apply_cifar_stem, backbone_args, build_backbone
from common.config import ConfigError, UsageError, load_config, usage
from common.data import EpochSampler, SeededViews, Synthetic, build_dataset, labels_of, subset
from common.knn import knn_predict, topk_correct
from common.runtime import changed_settings, load_checkpoint, rng_states, save_checkpoint, set_rng_states


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


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unknown config key 'lrr' on the command line (did you mean 'lr'?). Valid keys: lr, epochs"),
    (["--epochs", "1.5"], "'epochs' expects int, got 1.5"),
    (["--flag", "maybe"], "'flag' expects bool"),
    (["--lr"], "--lr needs a value"),
    (["epochs", "3"], "expected --key value"),
    (["--config", "/nonexistent.yaml"], "cannot read config file /nonexistent.yaml"),
])
def test_config_errors_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(Demo, argv)
    assert message in str(e.value)


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


def test_changed_settings_names_real_changes_only():
    """Resuming reports each changed value; a key the checkpoint predates (a new option) is no change."""
    saved = {"lr": 0.1, "epochs": 10, "name": "x", "scale": (0.08, 1.0), "resume": False}  # no "flag" yet
    cfg = Demo(lr=0.2, epochs=10, flag=True)
    assert changed_settings(saved, cfg) == ["lr: 0.1 -> 0.2"]


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
    assert len(ARCHS) == 12


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


def test_blur_only_at_96_px_and_above():
    def has_blur(t):
        return "GaussianBlur" in repr(t)
    assert not has_blur(two_views("sym", 32, "cifar10").transforms[0])
    assert has_blur(two_views("sym", 96, "stl10").transforms[0])


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


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    torch.manual_seed(5)
    states = rng_states()
    expected = torch.rand(3)
    save_checkpoint({"rng": states, "w": torch.ones(2)}, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")  # weights_only=True: plain tensors and Python values
    set_rng_states(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert not (tmp_path / "c.pt.tmp").exists()
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
