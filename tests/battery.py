"""Battery plumbing: MethodCase (what a method script declares to the battery), quick_args (a short run of a
method script on synthetic data), run_ranks (gloo processes, under NCCL's rules: tests/nccl_rules.py), and
HostSyncs / CountedLoader (what would make a GPU wait, counted on a CPU during chosen steps)."""
import importlib
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import nccl_rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(rank, world_size, init_file, out_dir, fn, args):
    nccl_rules.enforce()  # gloo would accept a non-contiguous tensor that NCCL rejects
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while another still has messages in flight
    dist.destroy_process_group()
    # the result is on disk: leave without running C++ static destructors, which now and then abort a
    # gloo process at exit ("terminate called without an active exception") after all work is done
    os._exit(0)


def run_ranks(fn, world_size, *args):
    """fn(rank, world_size, *args) runs in each of world_size gloo processes, under NCCL's rules for collectives
    (tests/nccl_rules.py); returns the list of its results. fn must be a module-level function (it is pickled)
    and its results torch.save-able."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


@dataclass
class MethodCase:
    """A method's entry in the battery (tests/test_battery.py). Each method's tests/test_<method>.py defines
    CASE = MethodCase(...); test_battery.METHODS finds it."""
    model: str  # the name of the script's model class (an nn.Module with .backbone and .backbone_args)
    inputs: Callable  # () -> dict of whole-batch tensors (batch first): the loss's inputs
    call: Callable  # (module, inputs) -> (loss, buffers dict); runs on a rank's share under torch.distributed
    reference: Callable  # (inputs) -> float: the paper's formula, one sample at a time
    small: list = field(default_factory=list)  # command-line overrides for quick CPU runs


def case_of(method):
    return importlib.import_module(f"test_{method}").CASE


# the `trained` runs (conftest.py): a snapshot every epoch, the kNN monitor and the online probe checked at epoch
# 2 (the probe trains every step), a checkpoint every 3 steps (mid-epoch: steps 3 and 6 of 4 an epoch), and every
# checkpoint kept
TRAINED_ARGS = ("--snapshot_every", "1", "--knn_every", "2", "--probe_every", "2", "--checkpoint_every_steps", "3",
                "--keep_checkpoints", "4")


def quick_args(method, out_dir, *extra, epochs=2):
    """The command line of a short run of `method`.py on synthetic data: 64 images of 16 px (a quarter of 32 px's
    compute: half of a short run's time), batch 16 per rank, the method's small heads, then `extra`."""
    return [f"{method}.py", "--dataset", "synthetic", "--image_size", "16", "--subset", "64", "--batch_size", "16",
            "--num_workers", "0",
            "--epochs", str(epochs), "--warmup_epochs", "1", "--out_dir", str(out_dir), *case_of(method).small,
            *extra]


# ---- (7) what would make a GPU wait for the host, counted on a CPU ----
class HostSyncs(TorchDispatchMode):
    """Counts, while `counting` is set, what would make the host wait for a GPU (a value read back; the rows of a
    boolean mask, whose number the host must learn; a collective's result read on the host) or make a step wait
    for a host-to-device copy (a tensor made from host data; a blocking .to(device)). On a CPU every tensor is
    on the host, so the kind of operation counts, not where its tensors are. found: 'what (file:line)' each."""

    SYNCS = {"aten._local_scalar_dense.default": "a value read on the host",
             "aten.nonzero.default": "nonzero", "aten.masked_select.default": "masked_select",
             "aten.equal.default": "torch.equal", "aten.is_nonzero.default": "a tensor's truth value",
             "aten.lift_fresh.default": "a tensor made from host data (a host-to-device copy on a GPU)"}
    INDEXING = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                "aten._index_put_impl_.default")

    # host-only work that looks like a sync on a CPU: (file, function) -> why it is none on a GPU
    HOST_ONLY = {("common/stopping.py", "agree"): "the stop-signal flags: a CPU tensor on the hosts' gloo group",
                 ("common/batched.py", "plan"): "the views' parameters, arranged on the host for their one copy"}

    def __init__(self):
        super().__init__()
        self.counting, self.found = False, []

    @staticmethod
    def ours(filename):
        """A file of the repository's code: not a test, nor a package installed in a virtual environment kept
        inside the repository (.venv/)."""
        return filename.startswith(REPO + os.sep) and "/tests/" not in filename and "site-packages" not in filename

    def note(self, what):
        stack = [f for f in traceback.extract_stack()[:-2] if self.ours(f.filename)]
        if any((os.path.relpath(f.filename, REPO), f.name) in self.HOST_ONLY for f in stack):
            return
        where = f"{os.path.relpath(stack[-1].filename, REPO)}:{stack[-1].lineno}" if stack else "?"
        self.found.append(f"{what} ({where})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            name = str(func)
            if name in self.SYNCS:
                self.note(self.SYNCS[name])
            elif name in self.INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else ()) or ()):
                self.note("boolean-mask indexing")
        return func(*args, **(kwargs or {}))

    def watch_copies(self, monkeypatch):
        """A blocking tensor.to(device) counts as a host-to-device copy (a non_blocking one from pinned memory
        does not wait)."""
        to = torch.Tensor.to

        def checked(tensor, *args, **kwargs):
            to_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
            ours = self.ours(sys._getframe(1).f_code.co_filename)  # not torch's own .to() of a device's tensor
            if self.counting and to_device and ours and not kwargs.get("non_blocking", False):
                self.note("a blocking copy to the device")
            return to(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", checked)


class CountedLoader:
    """pretrain_loader's loader, with `syncs` counting from the fetch of batch `start` until that of batch `stop`
    (the steps in between, nothing else); the fetch itself only with views made a batch at a time (on the
    training device), not with views made per image (in loader workers, on the host)."""

    def __init__(self, loader, syncs, start, stop, count_fetch):
        self.loader, self.syncs, self.start, self.stop, self.count_fetch = loader, syncs, start, stop, count_fetch

    def __getattr__(self, name):  # sampler, images
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for k in range(len(self.loader)):
            counted = self.start <= k < self.stop
            self.syncs.counting = counted and self.count_fetch
            batch = next(batches)
            self.syncs.counting = counted
            yield batch
        self.syncs.counting = False
