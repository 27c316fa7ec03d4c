"""One code path with or without torchrun: the process group (NCCL on GPUs, gloo on CPUs, with a collective
timeout) and what a rank does when another one of its job dies or hangs (exit status EXIT_LOST_RANK)."""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist


def init_distributed(timeout=600.0):
    """One code path with or without torchrun. Returns (rank, world_size, device). A collective that waits more
    than `timeout` seconds for another rank (dead or hung) fails instead of hanging (see lost_rank_errors)."""
    if torch.cuda.is_available():
        # the inputs keep their sizes from step to step (each crop size its own): cuDNN times its algorithms once
        # per shape and keeps the fastest, as the official repositories ask
        torch.backends.cudnn.benchmark = True
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        # NCCL's watchdog aborts the process when a collective times out (torchrun turns that on): a minute more
        # than the host-side gloo flags of Checkpointer.due(), so that a hung rank is usually reported by them
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank),
                                timeout=datetime.timedelta(seconds=timeout + 60))
        return rank, world_size, torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return rank, world_size, torch.device("cpu")


def close_distributed():
    """Wait for every rank, then tear the process group down (nothing to do without torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


EXIT_LOST_RANK = 77  # another process of the job died or did not answer within dist_timeout
# what the message of a collective's RuntimeError says when a peer died or hung: gloo's errors (some name gloo,
# some only the pair of processes, e.g. when a rank is stopped inside DDP's buffer broadcast) and NCCL's
LOST = ("gloo", "NCCL", "pair closure", "Connection closed by peer", "Connection reset by peer")


@contextlib.contextmanager
def lost_rank_errors():
    """Wrap a script's entry point: when another process of a torchrun job dies or hangs, the collective this
    rank waits in fails (at once, or after dist_timeout); say so in one line and exit with EXIT_LOST_RANK."""
    try:
        yield
    except RuntimeError as e:
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or any(sign in str(e) for sign in LOST))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {dist.get_rank()} lost contact with the other processes of this job: one stopped (see its "
              f"error above) or did not answer within dist_timeout ({first}). Run again to resume from the last "
              "checkpoint (docs/troubleshooting.md#a-lost-rank)", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_RANK)  # not SystemExit: tearing down a broken process group can hang
