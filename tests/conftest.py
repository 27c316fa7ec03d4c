"""Shared helpers for tests that run the scripts as subprocesses (from the repository root)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(args, timeout=300, **kw):
    """Run `python *args` in the repository root; returns the CompletedProcess (text stdout / stderr)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_torchrun(nproc, args, **kw):
    """Run a script under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU)."""
    return run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], **kw)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_clean_error(proc, contains=""):
    """A usage mistake: non-zero exit, one `error: ...` line on stderr, no traceback."""
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert contains in errors[0], errors[0]
