"""Stop signals (SIGTERM, SIGUSR1: what SLURM and spot-instance agents send before a kill) and the exit statuses
of a run that stops early. A lost rank exits with EXIT_LOST_RANK (77, common/distributed.py)."""
import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from common.distributed import close_distributed


# exit statuses besides 0 (done) and 1 (an error, with its message)
EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: a checkpoint of the last step was written; run the same command again
EXIT_FORCED = 76  # a second signal, or no checkpoint within stop_timeout: exited without one

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and spot-instance agents send before a kill
# the same signal again within this many seconds is the first one twice: SLURM signals every process of a job,
# and torchrun forwards what it gets to its workers
DUPLICATE_SIGNAL_S = 3.0


class StopSignals:
    """SIGTERM and SIGUSR1 for a training loop: the first one asks every rank to stop after the current step, once
    a checkpoint of it is written (agree() tells each rank, the same answer everywhere, and exit_after_checkpoint()
    exits with EXIT_PREEMPTED); a second one (another signal, or the same one again after DUPLICATE_SIGNAL_S), or
    stop_timeout seconds without getting there, exits at once with EXIT_FORCED (a checkpoint being written stays
    a temporary file)."""

    def __init__(self, stop_timeout, rank, world_size, dist_timeout):
        self.stop_timeout, self.rank, self.world_size = stop_timeout, rank, world_size
        self.signal, self.signal_at, self.deadline = None, 0.0, None
        self.pid = os.getpid()  # a DataLoader worker forked before its worker_init_fn inherits the handler
        # the per-step flags travel between the hosts (gloo), so asking never waits for the GPU
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=dist_timeout))
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        # os.write, not print: the handler may interrupt a print (tqdm's) of the main thread
        if os.getpid() != self.pid:
            return
        name = signal.Signals(signum).name
        if self.signal is not None:
            if name == self.signal and time.monotonic() - self.signal_at < DUPLICATE_SIGNAL_S:
                return  # the scheduler's signal, forwarded once more by torchrun
            _say(f"rank {self.rank}: {name} after {self.signal}: exiting now, without a checkpoint of this step "
                 f"(status {EXIT_FORCED})")
            os._exit(EXIT_FORCED)
        self.signal, self.signal_at = name, time.monotonic()
        self.deadline = threading.Timer(self.stop_timeout, self._deadline)
        self.deadline.daemon = True
        self.deadline.start()

    def _deadline(self):
        _say(f"rank {self.rank}: no checkpoint within stop_timeout {self.stop_timeout:g} s of {self.signal}: "
             f"exiting without one (status {EXIT_FORCED})")
        os._exit(EXIT_FORCED)

    def agree(self, *flags):
        """[a stop signal came to some rank, *flags: each raised on some rank], the same on every rank: one
        all_reduce between the hosts (a few microseconds with gloo), every step."""
        values = torch.tensor([float(self.signal is not None), *map(float, flags)])
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in values]

    def exit_after_checkpoint(self, written, is_main):
        """Call on every rank once the checkpoint (`written`: what and where) is on disk."""
        if self.deadline:  # the checkpoint is there: what is left (the teardown) may take its time
            self.deadline.cancel()
        if is_main:
            print(f"stopped on {self.signal or 'a stop signal'} after writing {written}; run the same command again "
                  "to resume", file=sys.stderr, flush=True)
        close_distributed()
        raise SystemExit(EXIT_PREEMPTED)


def _say(message):
    os.write(2, f"{message}\n".encode())
