"""scripts/reproduce_cifar10.sh and reproduce_imagenet.sh cannot run here (days of GPUs), bench/cifar_budget.py
takes hours: their --dry-run prints every command, and each command's settings are checked as its script would
read them (config file, flags)."""
import importlib
import re
import shlex
import subprocess
import sys

import pytest

from common.config import load_config
from helpers import REPO, assert_one_line_error, run_script

METHODS = {"simclr", "moco", "simsiam", "byol", "barlow", "swav", "dino", "nnclr", "relic", "supcon"}


def dry_run(suite, *args):
    result = subprocess.run(["bash", f"scripts/reproduce_{suite}.sh", "--dry-run", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("suite, gpus", [("cifar10", 1), ("cifar10", 4), ("imagenet", 8)])
def test_every_method_pretrains_then_is_evaluated_with_valid_settings(suite, gpus):
    commands = dry_run(suite, "--gpus", str(gpus))
    scripts = {}
    for command in commands:
        script = next((part for part in command if part.endswith(".py")), None)
        if script is None:  # CIFAR-10's download, once before the runs
            assert suite == "cifar10" and command[:2] == ["python", "-c"] and "download=True" in command[2]
            continue
        if gpus > 1:
            assert command[:2] == ["torchrun", f"--nproc_per_node={gpus}"]
        args = command[command.index(script) + 1:]
        cfg = load_config(importlib.import_module(script[:-3]).Config, args)  # the script's own parsing
        scripts.setdefault(script[:-3], []).append(cfg)
        if script[:-3] in METHODS:
            header = (REPO / args[args.index("--config") + 1]).read_text()
            stated = re.search(r"per rank: (\d+) x (\d+) GPUs = (\d+)", header)
            recipe_batch = int(stated.group(3)) if stated else 256  # CIFAR recipes: 256 on one GPU
            assert cfg.batch_size * gpus == recipe_batch, (script, args)  # the recipe's global batch kept
            assert cfg.epochs >= 100 and cfg.out_dir.startswith(f"runs/reproduce_{suite}/")
    assert METHODS <= set(scripts)  # every method, then a kNN and a linear probe of each run
    assert len(scripts["knn_eval"]) == len(scripts["linear_eval"]) == len(commands) // 3  # (and the download)
    if suite == "imagenet":  # the official linear protocols, e.g. MoCo's lr 30 at 256 and SimSiam's LARS at 4096
        probes = {cfg.checkpoint.split("/")[-2]: cfg for cfg in scripts["linear_eval"]}
        assert (probes["moco_v1"].lr, probes["moco_v1"].batch_size * gpus) == (30, 256)
        assert (probes["simsiam"].optimizer, probes["simsiam"].batch_size * gpus) == ("lars", 4096)


def test_bad_requests_are_one_line_errors():
    assert_one_line_error(run_script(["scripts/reproduce.py", "cifar10", "--dry-run", "nosuch"]),
                          "no run named nosuch in cifar10")
    assert_one_line_error(run_script(["scripts/reproduce.py", "cifar10", "--dry-run", "--gpus", "3"]),
                          "does not split over 3 GPUs")
    assert_one_line_error(run_script(["scripts/reproduce.py", "imagenet", "simclr"]), "imagenet needs --data")


def test_the_report_reads_the_evaluations_written_so_far(tmp_path):
    (tmp_path / "swav").mkdir()
    (tmp_path / "swav" / "knn.json").write_text('{"top1": 81.234}')
    result = run_script(["scripts/reproduce.py", "cifar10", "--report", "--out", tmp_path, "swav", "dino"])
    assert result.returncode == 0, result.stderr
    assert "| swav | - | 89.17 | 81.23 | 88.40 |" in result.stdout
    assert "| dino | - | 89.52 | - | 84.80 |" in result.stdout


def test_the_cifar_budget_runs_every_method_and_the_floor_with_valid_settings():
    result = run_script(["bench/cifar_budget.py", "--dry-run"])
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]
    methods = set()
    for command in commands[1:]:  # the first makes the random-init trunk
        script = command[1]
        cfg = load_config(importlib.import_module(script[:-3]).Config, command[2:])
        if script[:-3] in METHODS:
            methods.add(script[:-3])
            assert (cfg.subset, cfg.epochs, cfg.batch_size, cfg.views) == (10000, 20, 256, "batched")
    assert methods == METHODS and len(commands) == 3 * (len(METHODS) + 2)  # the floor, and simclr's second seed
    assert_one_line_error(run_script(["bench/cifar_budget.py", "--dry-run", "--methods", "mocco"]),
                          "no run named mocco")


def test_folders_given_are_relative_to_the_callers_folder(tmp_path):
    """Both drivers run their commands in the repository, but --out/--data typed elsewhere mean that folder's."""
    for script, args in [("scripts/reproduce.py", ["cifar10", "simclr", "--data", "cifar"]),
                         ("bench/cifar_budget.py", ["--methods", "simclr", "--data", "cifar"])]:
        result = subprocess.run([sys.executable, str(REPO / script), "--dry-run", "--out", "mine", *args],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"--out_dir {tmp_path / 'mine'}/" in result.stdout
        assert f"--data_dir {tmp_path / 'cifar'}" in result.stdout
