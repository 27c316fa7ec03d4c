"""knn_eval.py and linear_eval.py end to end on CPU, on a 1-epoch SimCLR checkpoint of the synthetic dataset
(ten classes told apart by colour, so a working evaluation is far above the 10% of chance)."""
import json
import os
import random

import pytest
import torch
from PIL import Image

from common.config import UsageError
from common.precision import resolve_precision
from helpers import REPO, assert_ok, assert_one_line_error, run_script, run_torchrun

# small fixed subsets keep every run a few seconds; k=20 because with k >= the bank size (100) every class
# votes and the weighted kNN is close to chance on a barely trained backbone
DATA = ["--train_subset", "100", "--val_subset", "50", "--num_workers", "0"]
KNN = ["knn_eval.py", *DATA, "--k", "20", "--precision", "fp32"]
LINEAR = ["linear_eval.py", *DATA, "--precision", "fp32"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("simclr")
    assert_ok(run_script(["simclr.py", "--dataset", "synthetic", "--epochs", "1", "--batch_size", "16",
                          "--subset", "64", "--num_workers", "0", "--proj_hidden_dim", "64", "--proj_dim", "32",
                          "--out_dir", out]))
    return out / "last.pt"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_sane(result, min_top1=0.0):
    assert 0.0 <= result["top1"] <= 100.0
    assert result["top1"] <= result["top5"] <= 100.0
    assert result["top1"] > min_top1, result


@pytest.fixture(scope="module")
def knn_single(checkpoint):
    """One single-process kNN run with the default output path; its JSON."""
    assert_ok(run_script([*KNN, "--checkpoint", checkpoint]))
    return read_json(checkpoint.parent / "last_knn_synthetic.json")


@pytest.fixture(scope="module")
def linear_cached(checkpoint):
    """One single-process linear probe on cached features with the default output path; its JSON."""
    assert_ok(run_script([*LINEAR, "--checkpoint", checkpoint, "--cache_features", "true", "--epochs", "10",
                          "--batch_size", "32"]))
    return read_json(checkpoint.parent / "last_linear_synthetic.json")


# ---- kNN ----
def test_knn_writes_json_next_to_checkpoint(knn_single, checkpoint):
    assert_sane(knn_single, min_top1=50.0)
    assert knn_single["dataset"] == "synthetic"  # taken from the checkpoint's config
    assert (knn_single["k"], knn_single["temperature"]) == (20, 0.07)
    assert (knn_single["num_train"], knn_single["num_val"]) == (100, 50)
    assert knn_single["checkpoint"] == str(checkpoint)


def test_knn_torchrun_matches_single_process(knn_single, checkpoint, tmp_path):
    out = tmp_path / "knn.json"
    assert_ok(run_torchrun(2, [*KNN, "--checkpoint", checkpoint, "--out", out]))
    result = read_json(out)
    assert result["world_size"] == 2
    assert (result["top1"], result["top5"]) == (knn_single["top1"], knn_single["top5"])
    assert (result["num_train"], result["num_val"]) == (100, 50)


def test_knn_plain_state_dict(knn_single, checkpoint, tmp_path):
    plain = tmp_path / "trunk.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["backbone"], plain)
    out = tmp_path / "knn.json"
    assert_ok(run_script([*KNN, "--checkpoint", plain, "--dataset", "synthetic", "--arch", "resnet18",
                          "--image_size", "32", "--cifar_stem", "true", "--out", out]))
    result = read_json(out)
    assert (result["top1"], result["top5"]) == (knn_single["top1"], knn_single["top5"])
    # without --arch nothing says how to build the trunk
    assert_one_line_error(run_script([*KNN, "--checkpoint", plain, "--dataset", "synthetic", "--image_size",
                                      "32"]), "--arch")
    assert not (tmp_path / "trunk_knn_synthetic.json").exists()


# ---- linear probe ----
def test_linear_cached_features(linear_cached):
    assert_sane(linear_cached, min_top1=50.0)
    assert linear_cached["cache_features"] is True
    assert (linear_cached["epochs"], linear_cached["num_train"], linear_cached["num_val"]) == (10, 100, 50)
    assert linear_cached["num_classes"] == 10


def test_linear_augmented_one_epoch(checkpoint, tmp_path):
    out = tmp_path / "linear.json"
    proc = run_script(["linear_eval.py", *DATA, "--checkpoint", checkpoint, "--epochs", "1", "--batch_size",
                       "32", "--out", out])  # default precision (auto)
    assert_ok(proc)
    result = read_json(out)
    assert_sane(result)
    auto = resolve_precision("auto", torch.device("cpu"), is_main=False)  # bf16 where this CPU has it, else fp32
    assert result["cache_features"] is False and (result["precision"], result["precision_reason"]) == auto
    assert result["train_loss"] > 0


def test_linear_probe_steps_never_wait_for_the_device(checkpoint, tmp_path, monkeypatch):
    """Between two readings of the loss (--log_every) the probe's steps on cached features read nothing back
    (tests/battery.py HostSyncs counts what would make a GPU wait); the cache is fp16 on a GPU (half of fp32's
    memory), fp32 on a CPU."""
    import linear_eval
    from battery import HostSyncs
    from common.config import parse_config
    syncs, batches = HostSyncs(), linear_eval.cached_batches

    def counted(*args):
        for k, batch in enumerate(batches(*args)):
            syncs.counting = 1 <= k < 3  # steps 2 and 3 of the first epoch
            yield batch
        syncs.counting = False
    monkeypatch.setattr(linear_eval, "cached_batches", counted)
    syncs.watch_copies(monkeypatch)
    with syncs:
        linear_eval.main(parse_config(linear_eval.Config, [
            *map(str, LINEAR[1:]), "--checkpoint", str(checkpoint), "--cache_features", "true", "--epochs", "1",
            "--batch_size", "16", "--log_every", "4", "--out", str(tmp_path / "probe.json")]))
    assert syncs.found == [] and read_json(tmp_path / "probe.json")["epochs"] == 1
    assert linear_eval.cache_dtype(torch.device("cuda", 0)) == torch.float16
    assert linear_eval.cache_dtype(torch.device("cpu")) == torch.float32


def test_an_fp16_cache_that_overflows_is_made_again_in_fp32(checkpoint, tmp_path, monkeypatch, capsys):
    """A trunk whose features exceed fp16's range (65504) on a GPU: the cache is extracted again in fp32, with a
    warning (a CPU plays the GPU: its cache asked in fp16, the features made to overflow there)."""
    import linear_eval
    from common.config import parse_config
    extract, dtypes = linear_eval.extract_features, []

    def overflowing(*args, dtype=torch.float32, **kwargs):
        dtypes.append(dtype)
        feats, labels = extract(*args, dtype=dtype, **kwargs)
        return (feats * 1e6).to(dtype) if dtype == torch.float16 else feats, labels
    monkeypatch.setattr(linear_eval, "cache_dtype", lambda device: torch.float16)
    monkeypatch.setattr(linear_eval, "extract_features", overflowing)
    linear_eval.main(parse_config(linear_eval.Config, [
        *map(str, LINEAR[1:]), "--checkpoint", str(checkpoint), "--cache_features", "true", "--epochs", "1",
        "--batch_size", "16", "--out", str(tmp_path / "probe.json")]))
    assert dtypes == [torch.float16, torch.float32, torch.float32]  # train (fp16, again fp32), then val
    assert "exceed fp16's range" in capsys.readouterr().err
    assert 0 <= read_json(tmp_path / "probe.json")["top1"] <= 100


def test_linear_torchrun_matches_single_process(linear_cached, checkpoint, tmp_path):
    """Two ranks, each half of a global batch of 32: the same training as one process with batches of 32."""
    out = tmp_path / "linear.json"
    assert_ok(run_torchrun(2, [*LINEAR, "--checkpoint", checkpoint, "--cache_features", "true", "--epochs",
                               "10", "--batch_size", "16", "--out", out]))
    result = read_json(out)
    assert (result["world_size"], result["global_batch"]) == (2, 32)
    assert result["train_loss"] == pytest.approx(linear_cached["train_loss"], rel=1e-4)
    assert abs(result["top1"] - linear_cached["top1"]) <= 100 / 50  # at most one val image (float rounding)


# ---- usage errors ----
@pytest.mark.quick
@pytest.mark.parametrize("script", ["knn_eval.py", "linear_eval.py"])
def test_corrupt_checkpoint(script, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(random.Random(0).randbytes(4096))
    assert_one_line_error(run_script([script, "--checkpoint", bad, *DATA]), str(bad))


@pytest.mark.quick
def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_script(["knn_eval.py", "--checkpoint", tmp_path / "nope.pt", *DATA]),
                          "does not exist")


@pytest.mark.quick
def test_finetune_settings_that_do_not_fit_are_one_line(checkpoint):
    assert_one_line_error(run_script([*LINEAR, "--checkpoint", checkpoint, "--finetune", "--cache_features", "true"]),
                          "--finetune trains the trunk on augmented images; it cannot use --cache_features true")
    assert_one_line_error(run_script([*LINEAR, "--checkpoint", checkpoint, "--finetune", "--finetune_lr", "-1"]),
                          "finetune_lr must not be negative")


@pytest.mark.parametrize("script, option", [("knn_eval.py", ["--arch", "resnet34"]),
                                            ("linear_eval.py", ["--cifar_stem", "false"])])
def test_a_checkpoint_of_another_backbone_says_what_it_holds(script, option, checkpoint):
    """The checkpoint holds a ResNet-18 with the CIFAR stem; another arch, or the ImageNet stem (other conv1
    weights), does not fit: one line with what it holds and what was asked for. (A ResNet evaluates at any
    --image_size: it pools globally.)"""
    result = run_script([script, "--checkpoint", checkpoint, *DATA, *option])
    assert_one_line_error(result, "holds the trunk of a SimCLR run with arch=resnet18, image_size=32, cifar_stem=")
    assert "the options ask for arch=" in result.stderr and "Leave out --arch, --image_size" in result.stderr


def test_a_vit_checkpoint_at_another_image_size_says_what_it_holds(tmp_path):
    """A ViT's position embeddings fix its image size: 64 px for a trunk trained at 32 px does not fit."""
    from common.backbones import backbone_args, build_backbone
    from common.config import UsageError
    from common.checkpoints import load_backbone
    args = backbone_args("vit_tiny", 32, patch_size=8)
    trunk, _ = build_backbone(**args)
    torch.save({"method": "DINO", "backbone": trunk.state_dict(), "backbone_args": args}, tmp_path / "last.pt")
    assert load_backbone(str(tmp_path / "last.pt"))[2] == args
    with pytest.raises(UsageError, match=r"holds the trunk of a DINO run with arch=vit_tiny, image_size=32, "
                                         r"cifar_stem=False, patch_size=8; the options ask for arch=vit_tiny, "
                                         r"image_size=64.* \(1 shape mismatches"):
        load_backbone(str(tmp_path / "last.pt"), image_size=64)


@pytest.mark.parametrize("finetune", [False, True])
def test_linear_probe_stopped_by_a_signal_resumes_exactly(checkpoint, tmp_path, finetune):
    """SIGTERM in the middle of a probe on augmented images: the step finishes, the head's state (fine-tuning: the
    trunk's too) is saved and the probe exits with 75; the same command continues it and reports exactly what an
    uninterrupted probe does."""
    import signal
    import subprocess
    import sys
    import time
    from helpers import REPO, _env
    args = [*LINEAR, "--checkpoint", checkpoint, "--epochs", "2", "--batch_size", "16", "--finetune", str(finetune),
            "--finetune_lr", "0.01", "--out"]
    assert_ok(run_script([*args, tmp_path / "straight.json"]))
    out, state = tmp_path / "stopped.json", tmp_path / "stopped.state.pt"
    proc = subprocess.Popen([sys.executable, *map(str, [*args, out])], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not state.exists() and proc.poll() is None:  # saved at the end of epoch 1
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and f"after writing {state} at step " in err, err[-3000:]
    stopped_at = torch.load(state, weights_only=True)["step"]
    resumed = run_script([*args, out])
    assert_ok(resumed)
    assert f"resuming the probe from {state} at step {stopped_at}" in resumed.stdout and not state.exists()
    straight, result = read_json(tmp_path / "straight.json"), read_json(out)
    assert (result["top1"], result["top5"], result["train_loss"]) == (straight["top1"], straight["top5"],
                                                                     straight["train_loss"])
    assert result["finetune"] is finetune and (tmp_path / "stopped.finetuned.pt").exists() is finetune
    if finetune:  # the whole network trained: its trunk moved, and it loads as a trunk of these scripts
        from common.checkpoints import load_backbone
        tuned, before = load_backbone(str(tmp_path / "stopped.finetuned.pt"))[0], load_backbone(str(checkpoint))[0]
        assert not torch.equal(tuned.conv1.weight, before.conv1.weight)
        straight_trunk = torch.load(tmp_path / "straight.finetuned.pt", weights_only=True)["backbone"]
        assert all(torch.equal(v, straight_trunk[k]) for k, v in tuned.state_dict().items())


# ---- label fractions: 1 % / 10 % of the labels ----
def test_label_fraction_takes_a_seeded_share_of_each_class():
    from common.data import Synthetic, label_fraction_subset, labels_of
    data = Synthetic(1000, 8, seed=0)  # 10 classes of 100
    chosen, how, digest = label_fraction_subset(data, 10, seed=0)
    labels = labels_of(chosen)
    assert [labels.count(c) for c in range(10)] == [10] * 10 and "seeded 10 % of each class" in how
    again, _, same = label_fraction_subset(data, 10, seed=0)
    assert again.indices == chosen.indices and same == digest
    assert label_fraction_subset(data, 10, seed=1)[2] != digest
    assert [labels_of(label_fraction_subset(data, 1)[0]).count(c) for c in range(10)] == [1] * 10
    assert label_fraction_subset(data, 100)[0] is data


def test_label_fraction_on_imagenet_uses_the_official_lists(tmp_path, monkeypatch):
    """A folder of ImageNet's synsets takes SimCLR's list of the fraction (a two-image list stands in here); a list
    naming a file the folder lacks is one clear error. The shipped lists: 12,811 and 128,116 images of 1000
    classes."""
    import common.data as data_module
    from common.data import build_dataset, label_fraction_subset
    for synset in ("n01440764", "n01443537"):
        (tmp_path / "train" / synset).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / synset / f"{synset}_{i}.JPEG")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "imagenet_1percent.txt").write_text("n01440764_2.JPEG\nn01443537_0.JPEG\n")
    monkeypatch.setattr(data_module, "LABEL_SPLITS", str(splits))
    train = build_dataset("folder", str(tmp_path), "train")
    chosen, how, _ = label_fraction_subset(train, 1)
    assert [os.path.basename(train.samples[i][0]) for i in chosen.indices] == ["n01440764_2.JPEG",
                                                                                "n01443537_0.JPEG"]
    assert "official 1 % list" in how
    (splits / "imagenet_1percent.txt").write_text("n01440764_7.JPEG\n")
    with pytest.raises(UsageError, match="names 1 files that are not in the train split .first: n01440764_7.JPEG"):
        label_fraction_subset(train, 1)
    for percent, count in ((1, 12811), (10, 128116)):
        names = (REPO / "configs" / "label_fractions" / f"imagenet_{percent}percent.txt").read_text().split()
        assert len(names) == len(set(names)) == count and len({n.split("_")[0] for n in names}) == 1000


def test_linear_probe_on_a_label_fraction_records_its_subset(checkpoint, tmp_path):
    out = tmp_path / "ten.json"
    assert_ok(run_script([*LINEAR, "--checkpoint", checkpoint, "--cache_features", "true", "--epochs", "2",
                          "--batch_size", "16", "--train_subset", "0", "--label_fraction", "10", "--out", out]))
    result = read_json(out)
    assert result["label_fraction"] == 10 and result["num_train"] == 100 and len(result["label_subset_sha1"]) == 40
    assert_one_line_error(run_script([*LINEAR, "--checkpoint", checkpoint, "--label_fraction", "5"]),
                          "label_fraction must be one of 1, 10, 100 (%), got 5")
