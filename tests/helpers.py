"""Shared test helpers: run the repo's scripts as a user would, check their error messages, and RunConfig (the
run settings common/ reads, for tests that call it in process)."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# the method scripts, SimCLR first (the reference of the parts every script shares)
METHODS = ["simclr", "byol", "simsiam", "barlow", "moco", "swav", "dino", "nnclr", "relic", "supcon"]
REPO = Path(__file__).resolve().parent.parent


def read_jsonl(path):
    """The JSON objects of a JSON-lines file (metrics.jsonl), in order."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_script(args, timeout=300, **kw):
    """`python <args>` in the repo root; returns the CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def run_torchrun(nproc, args, timeout=300):
    """`torchrun --standalone --nproc_per_node=<nproc> <args>` on gloo (CPU), every rank's script run under NCCL's
    rules for collectives (tests/nccl_rules.py: a non-contiguous tensor handed to one is an error)."""
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       "tests/nccl_rules.py", *args], timeout=timeout)


def assert_clean_error(result, fragment):
    """A user error: non-zero exit, a one-line 'error: ...' naming the problem, and no traceback."""
    assert result.returncode != 0, f"expected failure, got exit 0\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error:" in result.stderr and fragment in result.stderr, result.stderr[-3000:]


def assert_one_line_error(result, fragment):
    """assert_clean_error, and the message is exactly one `error: ...` line that names the problem."""
    assert_clean_error(result, fragment)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]


def assert_ok(result):
    """Exit 0; otherwise show the end of the output."""
    assert result.returncode == 0, (f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-3000:]}")


def fake_cpu(monkeypatch, machine="x86_64", amx=False, avx512_bf16=False, arm_bf16=False, capability="AVX2"):
    """What resolve_precision asks torch about this CPU, answered as a CPU of that kind would."""
    import torch

    monkeypatch.setattr("common.precision.platform.machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: arm_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@dataclass
class RunConfig:
    """The run settings common/ reads from a method script's Config."""
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    warmup_epochs: float = 1.0
    log_every: int = 10
    snapshot_every: int = 1
    knn_every: int = 0
    probe_every: int = 0
    probe_lr: float = 0.1
    num_workers: int = 0
    out_dir: str = "runs/demo"
    resume: str = "auto"
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 2
    stop_timeout: float = 60.0
    dist_timeout: float = 60.0
    skip_nonfinite: int = 0
    bad_images: str = "stop"
    logger: str = "none"
