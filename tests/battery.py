"""Battery plumbing: MethodCase (what a method script declares to the battery), quick_args (a short run of a
method script on synthetic data) and run_ranks (gloo processes)."""
import importlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, init_file, out_dir, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while another still has messages in flight
    dist.destroy_process_group()
    # the result is on disk: leave without running C++ static destructors, which now and then abort a
    # gloo process at exit ("terminate called without an active exception") after all work is done
    os._exit(0)


def run_ranks(fn, world_size, *args):
    """fn(rank, world_size, *args) runs in each of world_size processes; returns the list of its results.
    fn must be a module-level function (it is pickled) and its results torch.save-able."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


@dataclass
class MethodCase:
    """A method's entry in the battery (tests/test_battery.py). Each method has a tests/case_<method>.py
    defining CASE = MethodCase(...); test_battery.METHODS finds it."""
    model: str  # the name of the script's model class (an nn.Module with .backbone and .backbone_args)
    inputs: Callable  # () -> dict of whole-batch tensors (batch first): the loss's inputs
    call: Callable  # (module, inputs) -> (loss, buffers dict); runs on a rank's share under torch.distributed
    reference: Callable  # (inputs) -> float: the paper's formula, one sample at a time
    small: list = field(default_factory=list)  # command-line overrides for quick CPU runs


def case_of(method):
    return importlib.import_module(f"case_{method}").CASE


# the `trained` runs (conftest.py): a snapshot every epoch, the kNN monitor at epoch 2, a checkpoint every 3 steps
# (mid-epoch: steps 3 and 6 of 4 an epoch), and every checkpoint kept
TRAINED_ARGS = ("--snapshot_every", "1", "--knn_every", "2", "--checkpoint_every_steps", "3", "--keep_checkpoints", "4")


def quick_args(method, out_dir, *extra, epochs=2):
    """The command line of a short run of `method`.py on synthetic data: 64 images of 16 px (a quarter of 32 px's
    compute: half of a short run's time), batch 16 per rank, the method's small heads, then `extra`."""
    return [f"{method}.py", "--dataset", "synthetic", "--image_size", "16", "--subset", "64", "--batch_size", "16",
            "--num_workers", "0",
            "--epochs", str(epochs), "--warmup_epochs", "1", "--out_dir", str(out_dir), *case_of(method).small,
            *extra]
