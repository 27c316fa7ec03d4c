"""pytest set-up: the repository root on sys.path, so that tests import the scripts and common/, and the shared
uninterrupted runs that the battery and the reliability tests compare against. Helpers live in tests/helpers.py
and tests/battery.py; no test module imports this file."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from battery import TRAINED_ARGS, quick_args  # noqa: E402 (after the path set-up)
from helpers import run_script, run_torchrun  # noqa: E402


class Runs(dict):
    """One uninterrupted 2-epoch run per method, made the first time a test asks for that method and shared by
    the tests that follow: in one process (batch 16, 4 steps an epoch, a checkpoint every 3 steps and at each
    epoch's end, all kept, the kNN monitor and the online probe checked at epoch 2), or under torchrun
    with 2 ranks x 16 (a line in metrics.jsonl every step, the online probe checked every epoch)."""

    def __init__(self, root, ranks):
        super().__init__()
        self.root, self.ranks = root, ranks

    def __missing__(self, key):
        """key: a method, or (method, *more command-line arguments)."""
        method, *extra = (key,) if isinstance(key, str) else key
        out = self.root / "_".join(part.strip("-") for part in (method, *extra)) / "run"
        if self.ranks == 1:
            result = run_script(quick_args(method, out, *TRAINED_ARGS, *extra))
        else:
            result = run_torchrun(self.ranks, quick_args(method, out, "--snapshot_every", "1", "--log_every", "1",
                                                         "--probe_every", "1", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        self[key] = out
        return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("trained"), ranks=1)


@pytest.fixture(scope="session")
def trained_torchrun(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("torchrun"), ranks=2)
