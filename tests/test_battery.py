"""The battery every method script passes. To add a method: give tests/test_<method>.py its CASE (METHODS finds it).

(1) its loss equals a direct per-sample implementation of the paper's formula;
(2) two gloo processes, each holding half of a batch, give the same loss, gradients and buffers as one
    process holding the whole batch;
(3) it trains end to end on synthetic data in one process and under torchrun --nproc_per_node=2;
(4) interrupted and resumed, it ends with exactly the weights of an uninterrupted run; resumed on another
    number of ranks with the same global batch, it continues the same schedule;
(5) knn_eval.py and linear_eval.py accept its checkpoint;
(6) bad input gives a clear one-line error, and a non-finite loss never overwrites a good checkpoint;
plus its optimizer groups and LARS against the update rule, its lr schedule at its endpoints, the parts every
script shares being identical, and its configs parse.

Gradient convention of (2): DDP averages gradients over ranks, so what a rank's loss gives its own inputs,
divided by world_size, must equal the whole-batch gradient of those inputs.
"""
import importlib
import inspect
import json
import math
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from battery import TRAINED_ARGS, CountedLoader, HostSyncs, case_of, quick_args, run_ranks
from common.config import load_config, parse_config, usage_errors
from common.precision import resolve_precision
from common.step_metrics import StepMetrics
from helpers import REPO, assert_clean_error, assert_one_line_error, fake_cpu, read_jsonl, run_script

# every tests/test_<method>.py that defines a CASE is a method of the battery; SimCLR first, the reference of the
# shared parts
METHODS = sorted((p.stem[len("test_"):] for p in Path(__file__).parent.glob("test_*.py")
                  if re.search(r"^CASE = MethodCase\(", p.read_text(), flags=re.M)), key=lambda m: (m != "simclr", m))


def metrics_of(run):
    return read_jsonl(run / "metrics.jsonl")


# ---- (1) the loss against the paper's formula ----
@pytest.mark.quick
@pytest.mark.parametrize("method", METHODS)
def test_loss_matches_per_sample_formula(method):
    case, module = case_of(method), importlib.import_module(method)
    inputs = case.inputs()
    loss, _ = case.call(module, {k: v.clone() for k, v in inputs.items()})
    assert loss.item() == pytest.approx(case.reference(inputs), rel=1e-5, abs=1e-6)


# ---- (2) two ranks with half the batch each = one rank with the whole batch ----
def _half_batch(rank, world_size, method):
    case, module = case_of(method), importlib.import_module(method)
    share = {k: v.chunk(world_size)[rank].clone().requires_grad_(v.is_floating_point())  # labels: no gradient
             for k, v in case.inputs().items()}
    loss, buffers = case.call(module, share)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: _grad(v) for k, v in share.items()}, "buffers": buffers}


def _grad(x):
    """An input the loss detaches (a stop-gradient target) has no gradient: count it as zeros."""
    return torch.zeros_like(x) if x.grad is None else x.grad


@pytest.mark.parametrize("method", METHODS)
def test_distributed_equals_single_process(method):
    case, module = case_of(method), importlib.import_module(method)
    whole = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in case.inputs().items()}
    loss, buffers = case.call(module, whole)
    loss.backward()
    ranks = run_ranks(_half_batch, 2, method)
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, x in ((name, x) for name, x in whole.items() if x.is_floating_point()):  # not the labels
        per_rank = torch.cat([r["grads"][name] for r in ranks]) / len(ranks)
        torch.testing.assert_close(per_rank, _grad(x), rtol=1e-4, atol=1e-6)
    for name, value in buffers.items():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], value)


# ---- (3) end to end, one process and torchrun (the runs: conftest.py) ----
@pytest.mark.quick
@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_one_process(method, trained):
    out = trained[method]
    files = sorted(p.name for p in out.glob("*.pt"))  # a checkpoint every 3 steps and at each epoch's end (4 steps)
    assert files == ["epoch_0001.pt", "epoch_0002.pt", "last.pt", "step_00000003.pt", "step_00000004.pt",
                     "step_00000006.pt", "step_00000008.pt"]
    assert (out / "last.pt").samefile(out / "step_00000008.pt") and not list(out.glob("*.tmp"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (64 // 16)
    assert ckpt["schedule"] == {"world_size": 1, "global_batch": 16, "steps_per_epoch": 4, "total_steps": 8,
                                "peak_lr": ckpt["config"]["lr"] * 16 / 256}
    lines = metrics_of(out)
    assert lines[0]["event"] == "config" and lines[0]["global_batch"] == 16
    # precision auto: what this CPU computes natively (bf16 with AVX512-BF16, AMX or ARM's BF16; else fp32)
    precision, reason = resolve_precision("auto", torch.device("cpu"), is_main=False)
    assert (lines[0]["precision"], lines[0]["precision_reason"]) == (precision, reason)
    losses = [line["train/epoch_loss"] for line in lines if "train/epoch_loss" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    knn = [line for line in lines if "eval/knn_top1" in line]  # the online monitor ran once, at epoch 2
    assert [line["epoch"] for line in knn] == [2] and 0 <= knn[0]["eval/knn_top1"] <= 100
    probe = [line for line in lines if "eval/probe_top1" in line]  # the online probe, checked at epoch 2
    assert [line["epoch"] for line in probe] == [2] and all(0 <= line["eval/probe_top5"] <= 100 for line in probe)
    assert all(math.isfinite(line["train/epoch_probe_loss"]) for line in lines if "train/epoch_loss" in line)
    # the trunk alone loads into the matching torchvision model without renaming keys
    from common.backbones import build_backbone
    trunk, width = build_backbone(**ckpt["backbone_args"])
    trunk.load_state_dict(ckpt["backbone"], strict=True)
    assert ckpt["probe"]["head"]["1.weight"].shape == (10, width)  # the probe: the trunk's features -> 10 classes


@pytest.mark.quick
def test_default_precision_on_a_cpu_without_native_bf16_is_fp32(monkeypatch, tmp_path, capsys):
    """precision auto on an AVX2-only CPU (its capability check answered so): the run computes in fp32, says why
    once at start-up and writes it to config.json (the choice itself: test_common)."""
    fake_cpu(monkeypatch, capability="AVX2")
    autocasts = []
    module = importlib.import_module("simclr")
    monkeypatch.setattr(module, "autocast", lambda device, precision: autocasts.append(precision) or
                        torch.autocast("cpu", enabled=False))
    module.train(load_config(module.Config, quick_args("simclr", tmp_path, "--subset", "32", epochs=1)[1:]))
    config = json.loads((tmp_path / "config.json").read_text())
    reason = "auto: this CPU (AVX2 without AVX512-BF16 or AMX) does not compute bf16 natively"
    assert (config["precision"], config["precision_reason"]) == ("fp32", reason) and config["steps_per_epoch"] == 2
    assert autocasts == ["fp32", "fp32"] and capsys.readouterr().out.count(f"precision: fp32 ({reason})") == 1


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_torchrun(method, trained_torchrun):
    out = trained_torchrun[method]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 64 // (16 * 2)  # global batch 32
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 32
    steps = [line["step"] for line in metrics_of(out) if "train/loss" in line]
    assert steps == [1, 2, 3, 4] and all(math.isfinite(line["train/loss"]) for line in metrics_of(out)
                                         if "train/loss" in line)
    # the online probe under DDP: its gradient is averaged over the ranks (exactly: test_common), checked every epoch
    assert [line["epoch"] for line in metrics_of(out) if "eval/probe_top1" in line] == [1, 2]


# ---- (4) resume gives exactly the uninterrupted weights, and the same schedule on another world size ----
def assert_same_training_state(resumed, straight, probe=True):
    """Two checkpoints hold bit-identical weights, buffers and optimizer state, at the same step (and the same
    online probe, unless probe=False)."""
    assert resumed["step"] == straight["step"]
    for key in ("model", "backbone"):
        assert resumed[key].keys() == straight[key].keys()
        for name in straight[key]:
            assert torch.equal(resumed[key][name], straight[key][name]), f"{key}.{name} differs after resume"
    for a, b in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    if probe:  # the online probe's weights and momentum
        assert all(torch.equal(resumed["probe"]["head"][k], v) for k, v in straight["probe"]["head"].items())
        for a, b in zip(resumed["probe"]["optimizer"]["state"].values(),
                        straight["probe"]["optimizer"]["state"].values(), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in b)


# every method resumes mid epoch 1 (its views made a batch at a time, views: auto on synthetic data); SimCLR,
# whose plumbing every script shares (checked above and by reading), also mid epoch 2, and with views made per
# image in loader workers, resumed with 2 workers where the first run had none
RESUMES = [(method, 3, "auto", 0) for method in METHODS] + [("simclr", 6, "auto", 0), ("simclr", 3, "workers", 2)]


@pytest.mark.parametrize("method, stopped_after, views, workers", RESUMES)
def test_resume_is_exact(method, stopped_after, views, workers, trained, tmp_path):
    """A run stopped after step 3 (mid epoch 1) or 6 (mid epoch 2), its newest checkpoint that step's, runs the
    same command again (resume: auto): it skips the batches already done and ends with exactly the weights of
    the uninterrupted run (queues, EMA networks and buffers included), and the same epoch means in metrics.jsonl.
    Views made by loader workers must not depend on their number: the resumed run there has 2, the first none."""
    key = method if views == "auto" else (method, "--views", views)
    run = tmp_path / "run"
    run.mkdir()
    name = f"step_{stopped_after:08d}.pt"
    shutil.copy(trained[key] / name, run / name)
    args = quick_args(method, run, *TRAINED_ARGS, "--views", views)
    args[args.index("--num_workers") + 1] = str(workers)
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {run / name} at step {stopped_after}" in result.stdout
    assert_same_training_state(torch.load(run / "last.pt", weights_only=True),
                               torch.load(trained[key] / "last.pt", weights_only=True))

    def epoch_means(out):
        return [line["train/epoch_loss"] for line in metrics_of(out) if "train/epoch_loss" in line]

    assert epoch_means(run) == epoch_means(trained[key])[stopped_after // 4:]  # epochs completed after


class RecordedBatches:
    """Stands in for pretrain_loader's loader and keeps each batch it yields: (views, labels)."""

    def __init__(self, loader, batches):
        self.loader, self.batches = loader, batches

    def __getattr__(self, name):  # sampler, images
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch)
            yield batch


@pytest.mark.parametrize("method", METHODS)
def test_online_probe_sees_the_global_views_in_order_and_never_changes_the_trunk(method, tmp_path, monkeypatch):
    """Two in-process runs of 2 epochs of 2 steps, with the probe (trained every step, checked every epoch) and
    without. With it, the probe's hook keeps exactly the trunk's inputs of the global views in every step, in the
    order that its labels (each view's copy of the batch's) assume: view 1's images, then view 2's; not multi-crop's
    small crops, nor the key, target or teacher trunks'. Without it, the run ends with bit-identical weights,
    buffers, optimizer state and CPU generator: the probe learns from detached features, draws its weights in a
    fork of the CPU generator, and its checks' loader (after epoch 1) has a generator of its own."""
    from common.probe import OnlineProbe
    module = importlib.import_module(method)
    batches, inputs, probed = [], [], []
    make_loader, keep, step = module.pretrain_loader, OnlineProbe._keep, OnlineProbe.step

    def recording_keep(self, trunk, args, output):
        kept = len(self.features)
        keep(self, trunk, args, output)
        if len(self.features) > kept:
            inputs.append(args[0].detach().clone())

    def recording_step(self, labels, lr):
        probed.append((torch.cat(inputs), labels.clone()))
        inputs.clear()
        return step(self, labels, lr)

    with monkeypatch.context() as patch:
        patch.setattr(module, "pretrain_loader", lambda *args: RecordedBatches(make_loader(*args), batches))
        patch.setattr(OnlineProbe, "_keep", recording_keep)
        patch.setattr(OnlineProbe, "step", recording_step)
        module.train(load_config(module.Config, quick_args(method, tmp_path / "on", "--subset", "32",
                                                           "--probe_every", "1", epochs=2)[1:]))
    assert len(probed) == len(batches) == 4
    for (views, labels), (seen, seen_labels) in zip(batches, probed):
        assert torch.equal(seen, torch.cat(views[:2])) and torch.equal(seen_labels, labels)
    module.train(load_config(module.Config, quick_args(method, tmp_path / "off", "--subset", "32",
                                                       "--probe_every", "0", epochs=2)[1:]))
    with_probe, without = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("on", "off"))
    assert without["probe"] == {} and with_probe["probe"]
    assert_same_training_state(without, with_probe, probe=False)
    assert torch.equal(without["rng"]["torch"], with_probe["rng"]["torch"])


# SimCLR (the lr), and every method with a schedule of its own in metrics.jsonl (an EMA rate: "schedule/...")
SCHEDULED = [m for m in METHODS if m == "simclr" or '"schedule/' in inspect.getsource(importlib.import_module(m))]


@pytest.mark.parametrize("method", SCHEDULED)
def test_resume_on_another_world_size_continues_the_schedule(method, trained_torchrun, tmp_path):
    """A run of 2 ranks x 16, stopped after epoch 1, resumed in 1 process x 32 by the same command with --batch_size
    32 (resume: auto): the same global batch, so the same run, which the resume accepts. Every step of epoch 2 has
    the lr (and EMA rate) of the uninterrupted run. The images of each global batch are the same too:
    pretrain_loader's sharding, tested in test_common (test_pretrain_loader_global_batches_do_not_depend_on_ranks).
    What a resume must refuse, another global batch, is a bad-input scenario below."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_torchrun[method] / "epoch_0001.pt", run / "last.pt")
    args = quick_args(method, run, "--log_every", "1")
    args[args.index("--batch_size") + 1] = "32"
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch_size: 16 -> 32" in result.stdout  # reported, and accepted

    def schedule(out):
        return {line["step"]: {k: v for k, v in line.items() if k == "train/lr" or k.startswith("schedule/")}
                for line in metrics_of(out) if "train/lr" in line and line["epoch"] == 2}

    expected = schedule(trained_torchrun[method])
    assert sorted(expected) == [3, 4] and schedule(run) == expected
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4


# ---- (5) the evaluation scripts accept the checkpoint ----
@pytest.mark.parametrize("method", METHODS)
def test_eval_scripts_accept_checkpoint(method, trained, tmp_path):
    """Both evaluations, run in this process (their command lines are test_eval's), take the method's checkpoint."""
    import knn_eval
    import linear_eval
    ckpt = shutil.copy(trained[method] / "last.pt", tmp_path / "last.pt")
    knn_eval.main(load_config(knn_eval.Config, ["--checkpoint", str(ckpt), "--train_subset", "128", "--val_subset",
                                                "64", "--num_workers", "0"]))
    linear_eval.main(load_config(linear_eval.Config, ["--checkpoint", str(ckpt), "--train_subset", "128",
                                                      "--val_subset", "64", "--num_workers", "0", "--epochs", "2",
                                                      "--cache_features", "true", "--batch_size", "32"]))
    results = sorted(p.name for p in tmp_path.glob("*.json"))
    assert results == ["last_knn_synthetic.json", "last_linear_synthetic.json"]


# ---- (6) bad input ----
def _folder_without_val(root):
    """An ImageFolder tree with train/cat/ (20 small images) and no val/; returns root, a run's data_dir."""
    (root / "train" / "cat").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (32, 32), (i * 12, 0, 0)).save(root / "train" / "cat" / f"{i}.png")
    return root


def _resume_copy(trained, method, tmp_path, contents=None):
    run = tmp_path / "run"
    run.mkdir()
    if contents is None:
        shutil.copy(trained[method] / "epoch_0001.pt", run / "last.pt")
    else:
        (run / "last.pt").write_bytes(contents)
    return run


# scenario: (method, trained runs, tmp_path) -> (command line, what the one-line error says). One scenario for
# each place a script checks its input; the variants of each check (a wrong type, a bad YAML file, an
# unlabelled folder, ...) are tested once, in process, in test_common.py.
BAD_INPUT = {
    "unknown key": lambda m, t, tmp: (quick_args(m, tmp / "a", "--learning_rate", "0.1"),
                                      "unknown config key 'learning_rate' on the command line"),
    "missing data": lambda m, t, tmp: (quick_args(m, tmp / "a", "--dataset", "folder", "--data_dir",
                                                  tmp / "nowhere"), "nowhere"),
    "kNN monitor without val/": lambda m, t, tmp: (
        quick_args(m, tmp / "a", "--dataset", "folder", "--data_dir", _folder_without_val(tmp / "d"),
                   "--knn_every", "1"), "evaluation needs a val/ sub-folder"),
    "existing run, other settings": lambda m, t, tmp: (quick_args(m, t[m], *TRAINED_ARGS, "--lr", "0.123"),
                                                       "holds a run with other settings (lr: "),
    "corrupt checkpoint": lambda m, t, tmp: (
        quick_args(m, _resume_copy(t, m, tmp, b"\x00not a checkpoint" * 10), "--resume"), "cannot read checkpoint"),
    "checkpoint of another arch": lambda m, t, tmp: (
        quick_args(m, _resume_copy(t, m, tmp), "--resume", "--arch", "resnet34"), "with a resnet18 at 16 px; this"),
    "resume with another global batch": lambda m, t, tmp: (
        quick_args(m, _resume_copy(t, m, tmp), "--resume", "--batch_size", "8"), "global batch of 16"),
}


def _files(*folders):
    """Every file under the folders, with its size and modification time: what a refused start must not touch."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in folder.rglob("*")
            if p.is_file()}


# every scenario on SimCLR; on the other methods, the two whose checks depend on the script's own Config (the
# rest run the same common/ code in every script, and each costs a start of a script: the suite's time budget)
PER_METHOD = ("unknown key", "existing run, other settings")
BAD_INPUTS = [pytest.param(method, scenario, marks=[pytest.mark.quick] if method == "simclr" else [])
              for method in METHODS for scenario in BAD_INPUT if method == "simclr" or scenario in PER_METHOD]


def start_in_process(args):
    """A script's start in this process, up to the error its checks raise: what it prints on exit. Its entry point
    is the same two lines in every script, so only SimCLR's scenarios start a process of their own (each start
    costs about 4 s of imports); train() here installs the stop-signal handlers, which are put back after."""
    module = importlib.import_module(Path(args[0]).stem)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(SystemExit) as stopped, usage_errors():
            module.train(parse_config(module.Config, [str(a) for a in args[1:]]))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return SimpleNamespace(returncode=1, stdout="", stderr=str(stopped.value.code))


@pytest.mark.parametrize("method, scenario", BAD_INPUTS)
def test_bad_input_is_a_one_line_error(method, scenario, trained, tmp_path):
    args, fragment = BAD_INPUT[scenario](method, trained, tmp_path)
    before = _files(tmp_path, trained[method])
    result = run_script(args) if method == "simclr" else start_in_process(args)
    assert_one_line_error(result, fragment)
    if scenario.startswith("unknown key"):
        assert "Valid keys:" in result.stderr and " epochs," in result.stderr
    assert _files(tmp_path, trained[method]) == before  # every check runs before anything is written


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_loss_keeps_the_last_good_checkpoint(method, trained, tmp_path):
    """The epoch-1 state of the uninterrupted run, resumed with SGD at lr 1e30 (LARS would bound the steps):
    the loss turns non-finite in epoch 2, and the run stops, naming the step, with last.pt as it was."""
    run = _resume_copy(trained, method, tmp_path)
    before = _files(run)
    blown = run_script(quick_args(method, run, "--optimizer", "sgd", "--resume", "--lr", "1e30",
                                  "--warmup_epochs", "0", "--log_every", "1"))
    assert_clean_error(blown, "error: step ")
    assert " was not finite (loss " in blown.stderr and "keeps the last good state" in blown.stderr
    assert "resuming with changed settings: " in blown.stdout and "lr: " in blown.stdout
    assert [p.name for p in run.iterdir() if p.suffix in (".pt", ".tmp")] == ["last.pt"]  # no snapshot, no .tmp
    assert _files(run)[run / "last.pt"] == before[run / "last.pt"]  # last.pt untouched


@pytest.mark.parametrize("method", METHODS)
def test_a_skipped_step_leaves_weights_optimizer_and_buffers_as_they_were(method, trained, tmp_path, monkeypatch):
    """--skip_nonfinite: the epoch-1 state, resumed in this process with every step of epoch 2 reported non-finite
    (the loss StepMetrics.add is handed turns NaN; the check itself is tested in test_common): all 4 steps are
    skipped, and the trained weights, their EMA copies (targets, teacher, key encoder), the optimizer's state and
    the method's buffers (queues, centers) end exactly as they were. Only what a forward pass moves may change:
    BatchNorm statistics."""
    run = _resume_copy(trained, method, tmp_path)
    before = torch.load(run / "last.pt", weights_only=False)
    add = StepMetrics.add
    monkeypatch.setattr(StepMetrics, "add", lambda self, loss, **values: add(self, loss=loss * math.nan, **values))
    module = importlib.import_module(method)
    module.train(load_config(module.Config, quick_args(method, run, "--resume", "true", "--skip_nonfinite", "4")[1:]))
    after = torch.load(run / "last.pt", weights_only=False)
    assert after["step"] == before["step"] + 4 and after["metrics"]["skipped"] == 4
    moved = {name for name, value in before["model"].items() if not torch.equal(value, after["model"][name])}
    if method == "swav":  # each step starts by making the prototypes unit vectors (the official order): idempotent
        prototypes = before["model"]["prototypes.weight"]
        torch.testing.assert_close(after["model"]["prototypes.weight"], F.normalize(prototypes))
        moved.remove("prototypes.weight")
    allowed = ("running_mean", "running_var", "num_batches_tracked")
    assert {name for name in moved if not name.endswith(allowed)} == set()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(before["optimizer"]), _tensors(after["optimizer"])))


def _tensors(tree):
    """Every tensor in a nested dict / list, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


# ---- optimizer and schedules ----
@pytest.mark.parametrize("method", METHODS)
def test_lars_follows_its_update_rule(method):
    module = importlib.import_module(method)
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    lr, wd, eta, mom = 0.5, 0.1, 0.02, 0.9
    opt = module.LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, eta=eta, clip=False)
    opt.step()
    d = gw + wd * w0
    q = eta * w0.norm() / d.norm()
    torch.testing.assert_close(w.detach(), w0 - lr * q * d)
    torch.testing.assert_close(b.detach(), b0 - lr * gb)  # 1-d: no decay, no adaptation
    opt.step()  # momentum: the second step adds mom * the first update direction
    d2 = gw + wd * (w0 - lr * q * d)
    q2 = eta * (w0 - lr * q * d).norm() / d2.norm()
    torch.testing.assert_close(w.detach(), w0 - lr * q * d - lr * (mom * q * d + q2 * d2))
    # exclude_bias_and_norm=False (apex's LARC, the official SwAV): the bias decayed and adapted like a weight
    b.data.copy_(b0)
    adapted = module.LARS([b], lr=lr, momentum=mom, weight_decay=wd, eta=eta, clip=False, exclude_bias_and_norm=False)
    adapted.step()
    d = gb + wd * b0
    torch.testing.assert_close(b.detach(), b0 - lr * (eta * b0.norm() / d.norm()) * d)
    # clip: the adapted step never exceeds the scheduled one
    clipped = module.LARS([w], lr=1e-6, momentum=0.0, weight_decay=0.0, eta=1e3, clip=True)
    before = w.detach().clone()
    clipped.step()
    torch.testing.assert_close(w.detach(), before - 1e-6 * gw)


@pytest.mark.parametrize("method", METHODS)
def test_lars_allocates_its_momentum_buffers_once(method, monkeypatch):
    module = importlib.import_module(method)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    opt = module.LARS([w, b], lr=0.1)
    opt.step()
    buffers = [opt.state[p]["momentum_buffer"] for p in (w, b)]
    calls = []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: calls.append(a) or zeros_like(*a, **k))
    opt.step()
    opt.step()
    assert calls == [] and all(opt.state[p]["momentum_buffer"] is buf for p, buf in zip((w, b), buffers))


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
@pytest.mark.parametrize("method", METHODS)
def test_optimizer_groups_and_their_lr(method, optimizer):
    """Weights and (biases + norm parameters) in their own groups, every group's lr set by set_lr: the
    scheduled lr x its lr_ratio, or the peak lr in fixed_lr groups (SimSiam's predictor)."""
    case, module = case_of(method), importlib.import_module(method)
    cfg = module.Config(optimizer=optimizer, bias_lr_ratio=0.25, proj_hidden_dim=16, proj_dim=8)
    model = getattr(module, case.model)(cfg)
    opt = module.build_optimizer(cfg, model)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trained
    for group in opt.param_groups:
        ndims = {p.ndim > 1 for p in group["params"]}
        assert len(ndims) == 1 and group["lr_ratio"] == (1.0 if ndims == {True} else 0.25)
        assert group["weight_decay"] == (cfg.weight_decay if ndims == {True} else 0.0)
    module.set_lr(opt, 0.3, peak_lr=2.0)
    lrs = {(g["fixed_lr"], g["lr_ratio"], g["lr"]) for g in opt.param_groups}
    assert lrs == {(False, 1.0, 0.3), (False, 0.25, 0.075)}
    fixed = module.build_optimizer(cfg, model, fixed_lr=list(model.backbone.parameters()))
    module.set_lr(fixed, 0.3, peak_lr=2.0)
    held = {id(p) for g in fixed.param_groups if g["fixed_lr"] for p in g["params"]}
    assert held == {id(p) for p in model.backbone.parameters()}
    assert {g["lr"] for g in fixed.param_groups if g["fixed_lr"]} == {2.0, 0.5}


@pytest.mark.parametrize("method", METHODS)
def test_decay_bias_and_norm(method):
    """The official SimSiam decays every parameter: with SGD, decay_bias_and_norm puts the weight decay on
    biases and norm parameters too. The official SwAV's LARC decays and adapts every parameter: with LARS,
    decay_bias_and_norm does both (by default LARS leaves them out of both)."""
    case, module = case_of(method), importlib.import_module(method)
    for optimizer in ("sgd", "lars"):
        cfg = module.Config(optimizer=optimizer, decay_bias_and_norm=True, weight_decay=0.01, proj_hidden_dim=16,
                            proj_dim=8)
        opt = module.build_optimizer(cfg, getattr(module, case.model)(cfg))
        assert {g["weight_decay"] for g in opt.param_groups} == {0.01}
    assert {g["exclude_bias_and_norm"] for g in opt.param_groups} == {False}
    cfg.decay_bias_and_norm = False
    opt = module.build_optimizer(cfg, getattr(module, case.model)(cfg))
    assert {g["exclude_bias_and_norm"] for g in opt.param_groups} == {True}


@pytest.mark.parametrize("method", METHODS)
def test_lr_schedule_endpoints(method):
    lr_at = importlib.import_module(method).lr_at
    total, warmup, peak, low = 1000, 100, 2.0, 0.01
    assert lr_at(0, total, warmup, peak, low) == 0.0
    assert lr_at(50, total, warmup, peak, low) == pytest.approx(1.0)
    assert lr_at(warmup, total, warmup, peak, low) == pytest.approx(peak)
    assert lr_at(total, total, warmup, peak, low) == pytest.approx(low)
    values = [lr_at(s, total, warmup, peak, low) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(5, 10, 0, peak) == pytest.approx(peak / 2)  # no warm-up: cosine midpoint


SHARED = ["LARS", "build_optimizer", "set_lr", "lr_at"]
SHARED_IF_USED = {"GatherWithGrad": "simclr", "gather_with_grad": "simclr", "gather_no_grad": "moco", "enqueue": "moco",
                  "multi_crop_forward": "swav", "all_reduce_no_grad": "swav", "mlp": "simclr",  # DINO's head: GELU
                  "ema_update": "byol", "ema_at": "byol", "ddp_without_queue": "moco"}


@pytest.mark.parametrize("method", METHODS[1:])
def test_shared_parts_are_identical_to_simclr(method):
    """What every script holds a copy of is the same code, so that `diff simclr.py METHOD.py` shows the
    method; train() differs only in the method's lines (checked by reading, not here)."""
    reference, module = importlib.import_module("simclr"), importlib.import_module(method)
    for name in SHARED:
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(reference, name)), name
    for name, owner in SHARED_IF_USED.items():  # a cross-rank gather, the EMA: copied, never rewritten
        if hasattr(module, name) and method != owner:
            source = inspect.getsource(getattr(importlib.import_module(owner), name))
            assert inspect.getsource(getattr(module, name)) == source, name
    shared_config = {"epochs", "batch_size", "optimizer", "lars_eta", "precision", "resume", "knn_every"}
    assert shared_config <= set(module.Config.__dataclass_fields__)
    assert inspect.getsource(importlib.import_module("linear_eval").LARS) == inspect.getsource(reference.LARS)


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_residual_reaches_the_backbone(method):
    """--zero_init_residual (set by the ImageNet configs whose official code uses it) reaches the trunk f."""
    module = importlib.import_module(method)
    model_class = getattr(module, case_of(method).model)
    for flag in (False, True):
        model = model_class(module.Config(arch="resnet18", zero_init_residual=flag))
        gammas = [block.bn2.weight for layer in (model.backbone.layer1, model.backbone.layer4) for block in layer]
        assert all(bool((g == 0).all()) == flag for g in gammas)


@pytest.mark.parametrize("method", METHODS)
def test_configs_parse(method):
    from common.config import load_config
    module = importlib.import_module(method)
    names = sorted(p.name for p in (REPO / "configs").glob(f"{method}*.yaml"))  # moco: moco_v1.yaml, ...
    assert any(name.endswith("_imagenet.yaml") for name in names) and len(names) >= 2
    for name in names:
        cfg = load_config(module.Config, ["--config", str(REPO / "configs" / name)])
        assert cfg.out_dir == f"runs/{name[:-len('.yaml')]}", name
        assert cfg.precision in ("auto", "fp32"), name  # runs on any device (dino_vit: fp32, as the official advises)


# ---- (7) between log lines the host never waits for the device ----
@pytest.mark.parametrize("views", ["batched", "workers"])
@pytest.mark.parametrize("method", METHODS)
def test_no_host_sync_between_log_lines(method, views, tmp_path, monkeypatch):
    """Steps 2 and 3 of an epoch of 4 (no log line, no checkpoint, no kNN between them; the online probe's step
    included, with batched views), in the run's own precision (auto): nothing read back, no boolean mask, no tensor made from host
    data, no blocking copy to the device (tests/battery.py HostSyncs says what counts). The batched views are made
    in the step's time and are counted; per-image views are made in loader workers, on the host, and are not."""
    module = importlib.import_module(method)
    syncs = HostSyncs()
    syncs.watch_copies(monkeypatch)
    make_loader = module.pretrain_loader
    monkeypatch.setattr(module, "pretrain_loader", lambda *args: CountedLoader(make_loader(*args), syncs, 1, 3,
                                                                               count_fetch=views == "batched"))
    with syncs:
        module.train(load_config(module.Config, quick_args(method, tmp_path, "--views", views, "--log_every", "4",
                                                           "--probe_every", str(int(views == "batched")),
                                                           epochs=1)[1:]))
    assert syncs.found == []
