"""scripts/reproduce_cifar10.sh and reproduce_imagenet.sh cannot run here (days of GPUs), bench/cifar_budget.py
takes hours: their --dry-run prints every command, and each command's settings are checked as its script would
read them (config file, flags)."""
import importlib
import json
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


@pytest.mark.quick
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


def test_the_cifar_budget_keeps_each_finished_runs_row_with_earlier_ones(tmp_path, monkeypatch):
    """Its commands faked (each writes the evaluation JSON it names, and a pre-training its metrics.jsonl): after
    every run, the row joins --json's rows of earlier invocations and --markdown's table shows them all."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    budget = importlib.import_module("cifar_budget")
    ran = []

    def fake(command, **kwargs):
        ran.append(command)
        if "--out" in command:
            out = command[command.index("--out") + 1]
            with open(out, "w") as f:
                f.write('{"top1": %d.5, "top5": 90.25}' % (30 + len(ran)))
        elif "--out_dir" in command:
            folder = command[command.index("--out_dir") + 1]
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            lines = [{"train/epoch_loss": loss, "train/images_per_s": 500.0} for loss in (6.0, 5.5, 5.25)]
            lines += [{"eval/probe_top1": 30.0, "eval/probe_top5": 80.0}, {"eval/probe_top1": 33.0,
                                                                          "eval/probe_top5": 88.0}]
            (tmp_path / folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        else:  # the random-init trunk: its path is the command's last part
            (tmp_path / command[-1]).parent.mkdir(parents=True, exist_ok=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(budget.subprocess, "run", fake)
    monkeypatch.chdir(tmp_path)  # main() moves to the repository: the faked files go below tmp_path
    monkeypatch.setattr(budget, "REPO", str(tmp_path))
    (tmp_path / "cifar" / "train").mkdir(parents=True)
    earlier = {"run": "dino", "knn": [37.0, 88.6], "linear": [40.0, 90.0], "s_per_epoch": 70, "loss": [7.6, 7.0],
               "epochs": 20, "subset": 10000, "linear_epochs": 30, "flags": ["--lr", "0.12"],
               "commands": ["python dino.py --lr 0.12"], "machine": "an older CPU", "date": "2026-12-01"}
    (tmp_path / "kept.json").write_text(json.dumps([earlier]))
    budget.main(["--methods", "simclr", "--data", "cifar", "--json", "kept.json", "--markdown", "docs/bench.md"])
    kept = {r["run"]: r for r in json.loads((tmp_path / "kept.json").read_text())}
    assert set(kept) == {"floor", "simclr", "dino"} and kept["dino"] == earlier
    assert kept["simclr"]["knn"] == [35.5, 90.25] and kept["simclr"]["loss"] == [6.0, 5.25]
    assert kept["simclr"]["s_per_epoch"] == 20 and kept["floor"]["s_per_epoch"] is None
    text = (tmp_path / "docs" / "bench.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| floor", "| simclr", "| dino"]
    # the online probe at its last check; each row's machine by its number in the list above the table
    assert "| simclr | 35.50 / 90.25 | 36.50 / 90.25 | 33.00 / 88.00 | 20 | 6.000 -> 5.250 | `--optimizer sgd" in text
    older = re.search(r"\[(\d)\] an older CPU, computing in an unrecorded precision", text).group(1)
    assert f"| 2026-12-01 [{older}] |" in text and "| dino | 37.00 / 88.60 | 40.00 / 90.00 | - |" in text
    assert "python dino.py --lr 0.12" in text and "python simclr.py" in text and "--probe_every 5" in text
    assert "<!-- cifar_budget: written by bench/cifar_budget.py -->" in text
    assert ("Written by `python bench/cifar_budget.py --methods simclr --data cifar --json kept.json --markdown "
            "docs/bench.md`, with the rows of earlier invocations kept in `kept.json`") in text
    (tmp_path / "kept.json").write_text('{"not": "rows"')  # a broken file: a one-line error, the file untouched
    with pytest.raises(SystemExit, match="kept.json is not a list of this script's rows"):
        budget.main(["--methods", "simclr", "--data", "cifar", "--json", "kept.json"])
    assert (tmp_path / "kept.json").read_text() == '{"not": "rows"'
