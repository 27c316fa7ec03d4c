"""tools/plot_metrics.py: one PNG of a real run's curves; resumed logs, several runs, and its errors.
bench/throughput.py: a tiny run writes its tables (a benchmark, so nothing here asserts a speed).
bench/gpu_check.py: its dry run prints and parses every command; without a GPU it stops in one line."""
import json
import sys
from types import SimpleNamespace

import pytest

from helpers import REPO, assert_ok, assert_one_line_error, run_script
from tools.plot_metrics import panel_order, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_real_runs_curves_make_one_png(trained, tmp_path):
    """DINO's shared 2-epoch run (the kNN monitor and the online probe checked at epoch 2): its loss, lr,
    schedules, collapse signals, probe and kNN accuracies each get a panel, and the PNG is written where the
    run's folder is, or where --out says."""
    run = trained["dino"]
    keys = panel_order(read_metrics(run))
    assert keys[:2] == ["train/loss", "train/lr"] and keys[-2:] == ["eval/knn_top1", "eval/probe_top1"]
    assert {"schedule/ema", "schedule/teacher_temperature", "train/teacher_entropy", "train/kl",
            "train/probe_loss", "train/probe_top1"} <= set(keys)
    result = run_script(["tools/plot_metrics.py", run, "--out", tmp_path / "dino.png"])
    assert_ok(result)
    data = (tmp_path / "dino.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000  # a figure with curves, not an empty canvas
    result = run_script(["tools/plot_metrics.py", run / "metrics.jsonl", trained["simclr"], "--out",
                         tmp_path / "both.png"])
    assert_ok(result)
    assert (tmp_path / "both.png").read_bytes().startswith(PNG)


def test_a_resumed_log_keeps_the_later_value_of_a_step(tmp_path):
    lines = [{"event": "config", "lr": 0.1}, {"step": 10, "epoch": 1, "train/loss": 5.0},
             {"step": 20, "epoch": 1, "train/loss": 4.0}, {"step": 10, "epoch": 1, "train/loss": 4.5},
             {"step": 20, "epoch": 1, "train/loss": 3.9, "train/epoch_loss": 4.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 3')
    assert read_metrics(tmp_path) == {"train/loss": ([10, 20], [4.5, 3.9])}  # the torn last line is ignored


@pytest.mark.quick
def test_errors_are_one_line(tmp_path):
    assert_one_line_error(run_script(["tools/plot_metrics.py", tmp_path / "none"]), "no metrics.jsonl at")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "config"}) + "\n")
    assert_one_line_error(run_script(["tools/plot_metrics.py", tmp_path]), "holds no metrics yet")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    no_matplotlib = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                     f"sys.argv = ['plot_metrics.py', {str(tmp_path)!r}]; "
                     "runpy.run_path('tools/plot_metrics.py', run_name='__main__')")
    assert_one_line_error(run_script(["-c", no_matplotlib]), "plotting needs matplotlib")


def test_the_benchmark_writes_its_tables(tmp_path):
    result = run_script(["bench/throughput.py", "--methods", "simclr", "--modes", "batched", "--steps", "3",
                         "--warmup_steps", "1", "--repeats", "1", "--batch_size", "16", "--json", tmp_path / "b.json",
                         "--markdown", tmp_path / "b.md"], timeout=600)
    assert_ok(result)
    row, = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["batched"] > 0 and row["batched_peak_mb"] > 100  # torch alone takes more
    text = (tmp_path / "b.md").read_text()
    assert "python bench/throughput.py --methods simclr" in text and "| simclr | " in text and "peak RSS" in text
    assert "<!-- throughput (synthetic): written by bench/throughput.py -->" in text  # one section a data set


# ---- bench/gpu_check.py: its dry run, so that the GPU's first minutes measure instead of debugging ----
@pytest.mark.quick
def test_gpu_check_dry_run_prints_and_parses_every_command():
    """Every check's command is printed and its settings parsed (a method script's Config, or bench/throughput.py's
    arguments): every method script trains (ResNet-50; MoCo v3 and DINO with a ViT-S/16 too), SimCLR and DINO in
    fp16, the host-sync check, the SIGTERM-and-resume check, and the speed measurements, the JPEG folder's with
    --data."""
    result = run_script(["bench/gpu_check.py", "--dry-run", "--data", "/tmp/cifar10-jpeg"])
    assert_ok(result)
    lines = result.stdout.splitlines()
    runs = [line for line in lines if line.startswith("[train]")]
    for method in ("simclr", "moco", "simsiam", "byol", "barlow", "swav", "dino", "nnclr", "relic", "supcon"):
        assert any(f" {method}.py --config" in line for line in runs), method
    assert any("moco_v3_vit_imagenet" in line for line in runs) and any("dino_imagenet" in line for line in runs)
    kinds = {line.split("]")[0][1:] for line in lines if line.startswith("[")}
    assert kinds == {"train", "fp16", "sync", "resume", "speed"}
    assert [line.split()[1] for line in lines if line.startswith("[fp16]")] == ["simclr:", "dino_vit:"]
    assert any("--compile true" in line for line in lines) and any("--dataset folder" in line for line in lines)
    assert lines[-1] == "21 checks; every method run's settings parse"


def test_gpu_check_dry_run_stops_on_a_setting_that_no_longer_parses(monkeypatch):
    """The dry run is what keeps the check from rotting: a key a script no longer has stops it, naming the key."""
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check
    from common.config import ConfigError
    monkeypatch.setattr(gpu_check, "RUNS", [(n, s, c, [*o, "--no_such_key", "1"]) for n, s, c, o in gpu_check.RUNS])
    check = next(c for c in gpu_check.plan(SimpleNamespace(data="", gpus=1), "/tmp/out") if c.name == "dino_r50")
    with pytest.raises(ConfigError, match="unknown config key 'no_such_key'"):
        gpu_check.parse_settings(check)


@pytest.mark.quick
def test_gpu_check_needs_a_gpu_and_a_positive_budget():
    assert_one_line_error(run_script(["bench/gpu_check.py"]), "needs a CUDA GPU and none is visible")
    assert_one_line_error(run_script(["bench/gpu_check.py", "--minutes", "0", "--dry-run"]),
                          "--minutes and --gpus must be positive")


# ---- tools/export.py: the trunk for torchvision, timm and detectron2 ----
def _checkpoint(path, arch, image_size, patch_size=16):
    """A checkpoint of these scripts' format holding a freshly built trunk (the ImageNet stem at 224 px)."""
    import torch

    from common.backbones import backbone_args, build_backbone
    torch.manual_seed(0)
    args = backbone_args(arch, image_size, "false", patch_size)
    trunk, _ = build_backbone(**args)
    torch.save({"backbone": trunk.state_dict(), "backbone_args": args, "method": "SimCLR"}, path)
    return trunk.eval()


def test_export_torchvision_loads_into_torchvisions_model(trained, tmp_path):
    """The battery's SimCLR run (ResNet-18, CIFAR stem): the export loads strict into torchvision's resnet18 with
    fc removed and the CIFAR stem applied, and computes what the trunk computes."""
    import torch
    import torch.nn as nn
    import torchvision

    from common.backbones import apply_cifar_stem
    from common.checkpoints import load_backbone
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes((trained["simclr"] / "last.pt").read_bytes())
    assert_ok(run_script(["tools/export.py", ckpt]))
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    apply_cifar_stem(net)
    net.load_state_dict(torch.load(tmp_path / "last_torchvision.pt", weights_only=True), strict=True)
    trunk = load_backbone(str(ckpt))[0].eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), trunk(x))


@pytest.mark.parametrize("arch, timm_name", [("resnet18", "resnet18"), ("vit_small", "vit_small_patch16_224")])
def test_export_timm_loads_into_timms_model(tmp_path, arch, timm_name):
    """timm's names for the same architecture: the export loads strict into timm.create_model(name,
    num_classes=0) and gives the trunk's features."""
    import timm
    import torch
    trunk = _checkpoint(tmp_path / "last.pt", arch, 224)
    assert_ok(run_script(["tools/export.py", tmp_path / "last.pt", "--format", "timm"]))
    model = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    model.load_state_dict(torch.load(tmp_path / "last_timm.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trunk(x), atol=1e-4, rtol=1e-4)


def test_export_detectron2_renames_as_mocos_conversion(tmp_path):
    """detectron2's ResNet names (MoCo's convert-pretrain-to-detectron2.py): stem, res2-5, convN.norm, shortcut;
    numpy arrays; matching_heuristics on."""
    import pickle
    trunk = _checkpoint(tmp_path / "last.pt", "resnet18", 224)
    assert_ok(run_script(["tools/export.py", tmp_path / "last.pt", "--format", "detectron2", "--out",
                          tmp_path / "r18.pkl"]))
    exported = pickle.load(open(tmp_path / "r18.pkl", "rb"))
    assert exported["matching_heuristics"] is True
    model = exported["model"]
    assert len(model) == len(trunk.state_dict())
    for key in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight",
                "res2.1.conv2.norm.bias", "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean",
                "res5.1.conv2.weight"):
        assert key in model, key
    assert (model["res3.0.shortcut.weight"] == trunk.layer2[0].downsample[0].weight.detach().numpy()).all()


@pytest.mark.quick
def test_export_errors_are_one_line(tmp_path):
    _checkpoint(tmp_path / "last.pt", "resnet18", 224)
    assert_one_line_error(run_script(["tools/export.py", tmp_path / "last.pt", "--format", "onnx"]),
                          "format must be one of torchvision, timm, detectron2")
    _checkpoint(tmp_path / "vit.pt", "vit_tiny", 32, patch_size=8)
    assert_one_line_error(run_script(["tools/export.py", tmp_path / "vit.pt", "--format", "detectron2"]),
                          "takes a ResNet with the ImageNet stem")
    assert_one_line_error(run_script(["tools/export.py", tmp_path / "missing.pt"]), "does not exist")


# ---- tools/visualize_attention.py: the last block's class-token attention of a ViT ----
def test_last_block_attention_is_the_blocks_own_softmax():
    """The maps equal the class token's row of the last block's attention weights as nn.MultiheadAttention itself
    computes them (per head, the class token's own weight left out)."""
    import torch
    sys.path.insert(0, str(REPO / "tools"))
    from visualize_attention import last_block_attention

    from common.backbones import backbone_args, build_backbone
    torch.manual_seed(0)
    vit = build_backbone(**backbone_args("vit_tiny", 32, patch_size=8))[0].eval()
    x = torch.randn(2, 3, 32, 32)
    maps = last_block_attention(vit, x)
    assert maps.shape == (3, 2, 4, 4)  # heads x images x grid
    captured = {}
    block = vit.encoder.layers[-1]
    block.register_forward_pre_hook(lambda module, args: captured.update(tokens=args[0]))
    with torch.no_grad():
        vit(x)
        y = block.ln_1(captured["tokens"])
        _, weights = block.self_attention(y, y, y, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(maps, weights[:, :, 0, 1:].reshape(2, 3, 4, 4).transpose(0, 1))


def test_visualize_attention_draws_one_png(tmp_path):
    from PIL import Image
    _checkpoint(tmp_path / "vit.pt", "vit_tiny", 32, patch_size=8)
    images = []
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(tmp_path / f"{i}.png")
        images.append(tmp_path / f"{i}.png")
    result = run_script(["tools/visualize_attention.py", tmp_path / "vit.pt", *images, "--out", tmp_path / "a.png"])
    assert_ok(result)
    assert (tmp_path / "a.png").read_bytes().startswith(PNG) and "3 heads x 2 images" in result.stdout
    _checkpoint(tmp_path / "r18.pt", "resnet18", 32)
    assert_one_line_error(run_script(["tools/visualize_attention.py", tmp_path / "r18.pt", *images]),
                          "attention maps need a ViT")
    assert_one_line_error(run_script(["tools/visualize_attention.py", tmp_path / "vit.pt", tmp_path / "none.png"]),
                          "cannot read image")
