"""tools/plot_metrics.py: one PNG of a real run's curves; resumed logs, several runs, and its errors.
bench/throughput.py: a tiny run writes its tables (a benchmark, so nothing here asserts a speed).
bench/gpu_check.py: its dry run prints and parses every command; without a GPU it stops in one line."""
import json
from types import SimpleNamespace

import pytest

from helpers import REPO, assert_ok, assert_one_line_error, run_script
from tools.plot_metrics import panel_order, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_real_runs_curves_make_one_png(trained, tmp_path):
    """DINO's shared 2-epoch run (the kNN monitor on at epoch 2): its loss, lr, schedules, collapse signals and
    kNN accuracy each get a panel, and the PNG is written where the run's folder is, or where --out says."""
    run = trained["dino"]
    keys = panel_order(read_metrics(run))
    assert keys[:2] == ["train/loss", "train/lr"] and keys[-1] == "eval/knn_top1"
    assert {"schedule/ema", "schedule/teacher_temperature", "train/teacher_entropy", "train/kl"} <= set(keys)
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
    check = next(c for c in gpu_check.plan(SimpleNamespace(data=""), "/tmp/out") if c.name == "dino_r50")
    with pytest.raises(ConfigError, match="unknown config key 'no_such_key'"):
        gpu_check.parse_settings(check)


@pytest.mark.quick
def test_gpu_check_needs_a_gpu_and_a_positive_budget():
    assert_one_line_error(run_script(["bench/gpu_check.py"]), "needs a CUDA GPU and none is visible")
    assert_one_line_error(run_script(["bench/gpu_check.py", "--minutes", "0", "--dry-run"]),
                          "--minutes must be positive")
