"""The battery every method script passes. To add a method: tests/case_<method>.py and its name in METHODS.

(1) its loss equals a direct per-sample implementation of the paper's formula;
(2) two gloo processes, each holding half of a batch, give the same loss, gradients and buffers as one
    process holding the whole batch;
(3) it trains end to end on synthetic data in one process and under torchrun --nproc_per_node=2;
(4) interrupted and resumed, it ends with exactly the weights of an uninterrupted run;
(5) knn_eval.py and linear_eval.py accept its checkpoint;
(6) bad input gives a clear error, and a non-finite loss never overwrites a good checkpoint;
plus its LARS against the update rule, its lr schedule at its endpoints, and its configs parse.

Gradient convention of (2): DDP averages gradients over ranks, so what a rank's loss gives its own inputs,
divided by world_size, must equal the whole-batch gradient of those inputs.
"""
import hashlib
import importlib
import json
import math
import shutil

import pytest
import torch

from battery import run_ranks
from conftest import REPO, assert_clean_error, run_script, run_torchrun


METHODS = ["simclr", "byol", "simsiam", "barlow"]  # to add one: write tests/case_<method>.py, add it here


def case_of(method):
    return importlib.import_module(f"case_{method}").CASE


def quick_args(method, out_dir, epochs=2, *extra):
    return [f"{method}.py", "--dataset", "synthetic", "--subset", "64", "--batch_size", "16", "--num_workers", "0",
            "--epochs", str(epochs), "--warmup_epochs", "1", "--out_dir", str(out_dir), *case_of(method).small,
            *extra]


# ---- (1) the loss against the paper's formula ----
@pytest.mark.parametrize("method", METHODS)
def test_loss_matches_per_sample_formula(method):
    case, module = case_of(method), importlib.import_module(method)
    inputs = case.inputs()
    loss, _ = case.call(module, {k: v.clone() for k, v in inputs.items()})
    assert loss.item() == pytest.approx(case.reference(inputs), rel=1e-5, abs=1e-6)


# ---- (2) two ranks with half the batch each = one rank with the whole batch ----
def _half_batch(rank, world_size, method):
    case, module = case_of(method), importlib.import_module(method)
    share = {k: v.chunk(world_size)[rank].clone().requires_grad_() for k, v in case.inputs().items()}
    loss, buffers = case.call(module, share)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: _grad(v) for k, v in share.items()}, "buffers": buffers}


def _grad(x):
    """An input the loss detaches (a stop-gradient target) has no gradient: count it as zeros."""
    return torch.zeros_like(x) if x.grad is None else x.grad


@pytest.mark.parametrize("method", METHODS)
def test_distributed_equals_single_process(method):
    case, module = case_of(method), importlib.import_module(method)
    whole = {k: v.clone().requires_grad_() for k, v in case.inputs().items()}
    loss, buffers = case.call(module, whole)
    loss.backward()
    ranks = run_ranks(_half_batch, 2, method)
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, x in whole.items():
        per_rank = torch.cat([r["grads"][name] for r in ranks]) / len(ranks)
        torch.testing.assert_close(per_rank, _grad(x), rtol=1e-4, atol=1e-6)
    for name, value in buffers.items():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], value)


# ---- (3) end to end, one process and torchrun ----
class TrainedRuns(dict):
    """One uninterrupted 2-epoch run per method (a snapshot every epoch, the kNN monitor at epoch 2), made
    the first time a test asks for that method, and shared by the tests that follow."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, method):
        out = self.root / method / "run"
        result = run_script(quick_args(method, out, 2, "--snapshot_every", "1", "--knn_every", "2"))
        assert result.returncode == 0, result.stderr[-3000:]
        self[method] = out
        return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return TrainedRuns(tmp_path_factory.mktemp("trained"))


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_one_process(method, trained):
    out = trained[method]
    assert (out / "last.pt").exists() and (out / "epoch_0001.pt").exists() and (out / "epoch_0002.pt").exists()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (64 // 16)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "config" and lines[0]["global_batch"] == 16
    losses = [line["train/epoch_loss"] for line in lines if "train/epoch_loss" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    knn = [line for line in lines if "eval/knn_top1" in line]  # the online monitor ran once, at epoch 2
    assert [line["epoch"] for line in knn] == [2] and 0 <= knn[0]["eval/knn_top1"] <= 100
    # the trunk alone loads into the matching torchvision model without renaming keys
    from common.backbones import build_backbone
    trunk, _ = build_backbone(**ckpt["backbone_args"])
    trunk.load_state_dict(ckpt["backbone"], strict=True)


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_torchrun(method, tmp_path):
    result = run_torchrun(2, quick_args(method, tmp_path / "run", 1))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 64 // (16 * 2)  # global batch 32
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 32


# ---- (4) resume gives exactly the uninterrupted weights ----
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(method, trained, tmp_path):
    """Resume from the epoch-1 snapshot of the uninterrupted run, as a run stopped during epoch 2 would.
    The resumed run uses 2 data-loading workers where the first used none: views must not depend on it."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained[method] / "epoch_0001.pt", run / "last.pt")
    args = quick_args(method, run, 2, "--resume")
    args[args.index("--num_workers") + 1] = "2"
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(run / "last.pt", weights_only=True)
    straight = torch.load(trained[method] / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"]
    for key in ("model", "backbone"):
        assert resumed[key].keys() == straight[key].keys()
        for name in straight[key]:
            assert torch.equal(resumed[key][name], straight[key][name]), f"{key}.{name} differs after resume"
    for a, b in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)


# ---- (5) the evaluation scripts accept the checkpoint ----
@pytest.mark.parametrize("method", METHODS)
def test_eval_scripts_accept_checkpoint(method, trained, tmp_path):
    ckpt = shutil.copy(trained[method] / "last.pt", tmp_path / "last.pt")
    knn = run_script(["knn_eval.py", "--checkpoint", str(ckpt), "--train_subset", "128", "--val_subset", "64",
                      "--num_workers", "0"])
    assert knn.returncode == 0, knn.stderr[-3000:]
    linear = run_script(["linear_eval.py", "--checkpoint", str(ckpt), "--train_subset", "128", "--val_subset",
                         "64", "--num_workers", "0", "--epochs", "2", "--cache_features", "true", "--batch_size", "32"])
    assert linear.returncode == 0, linear.stderr[-3000:]
    results = sorted(p.name for p in tmp_path.glob("*.json"))
    assert results == ["last_knn_synthetic.json", "last_linear_synthetic.json"]


# ---- (6) bad input ----
@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_a_clear_error(method, trained, tmp_path):
    unknown = run_script(quick_args(method, tmp_path / "a", 1, "--learning_rate", "0.1"))
    assert_clean_error(unknown, "unknown config key 'learning_rate'")
    assert "Valid keys:" in unknown.stderr and " epochs," in unknown.stderr
    wrong_type = run_script(quick_args(method, tmp_path / "b", 1, "--epochs", "two"))
    assert_clean_error(wrong_type, "'epochs' expects int")
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("epochs: 2\nbatchsize: 8\n")
    bad_yaml = run_script([f"{method}.py", "--config", str(yaml_file)])
    assert_clean_error(bad_yaml, "unknown config key 'batchsize'")
    missing = run_script(quick_args(method, tmp_path / "c", 1) + ["--dataset", "folder", "--data_dir",
                                                                  str(tmp_path / "nowhere")])
    assert_clean_error(missing, "nowhere")
    # an existing run is never trained over without --resume
    again = run_script(quick_args(method, trained[method], 2))
    assert_clean_error(again, "--resume")
    # a corrupt last.pt is reported, not loaded
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(b"\x00not a checkpoint" * 10)
    assert_clean_error(run_script(quick_args(method, corrupt, 2, "--resume")), "cannot read checkpoint")
    # a checkpoint resumed with a config it does not fit (another arch) is reported, not half-loaded
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained[method] / "epoch_0001.pt", other / "last.pt")
    assert_clean_error(run_script(quick_args(method, other, 2, "--resume", "--arch", "resnet34")),
                       "does not fit this run's")


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_loss_keeps_the_last_good_checkpoint(method, tmp_path):
    run = tmp_path / "run"
    first = run_script(quick_args(method, run, 1, "--optimizer", "sgd"))
    assert first.returncode == 0, first.stderr[-3000:]
    digest = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()
    blown = run_script(quick_args(method, run, 3, "--optimizer", "sgd", "--resume", "--lr", "1e30",
                                  "--warmup_epochs", "0"))
    assert_clean_error(blown, "loss is nan")
    assert "resuming with changed settings: epochs: 1 -> 3; lr: " in blown.stdout
    assert hashlib.sha256((run / "last.pt").read_bytes()).hexdigest() == digest
    assert not list(run.glob("*.tmp"))


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
    # clip: the adapted step never exceeds the scheduled one
    clipped = module.LARS([w], lr=1e-6, momentum=0.0, weight_decay=0.0, eta=1e3, clip=True)
    before = w.detach().clone()
    clipped.step()
    torch.testing.assert_close(w.detach(), before - 1e-6 * gw)


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


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_residual_reaches_the_backbone(method):
    """--zero_init_residual (set by the ImageNet configs whose official code uses it) reaches the trunk f."""
    module = importlib.import_module(method)
    model_class = next(c for c in vars(module).values()  # the script's model: its one nn.Module class
                       if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == method)
    for flag in (False, True):
        model = model_class(module.Config(arch="resnet18", zero_init_residual=flag))
        gammas = [block.bn2.weight for layer in (model.backbone.layer1, model.backbone.layer4) for block in layer]
        assert all(bool((g == 0).all()) == flag for g in gammas)


@pytest.mark.parametrize("method", METHODS)
def test_configs_parse(method):
    from common.config import load_config
    module = importlib.import_module(method)
    for name in (f"{method}.yaml", f"{method}_imagenet.yaml"):
        cfg = load_config(module.Config, ["--config", str(REPO / "configs" / name)])
        assert cfg.out_dir.startswith("runs/")
