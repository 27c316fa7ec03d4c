"""The training loop's per-step scalars, kept on the device and read every log_every steps: the loss, the gradient
norm and a method's monitors, averaged over ranks; a non-finite step stops the run (or is skipped)."""
import math
import sys

import torch
import torch.distributed as dist


class StepMetrics:
    """Per-step scalars of the training loop (the loss, the gradient norm, a collapse monitor), kept on the
    device: the loop never reads a value back, which on a GPU would stall its launch queue every step (fp16's
    GradScaler still checks its gradients for inf on the host every step; bf16 and fp32 never wait). read() --
    every log_every steps, at a checkpoint and at the end of an epoch, on every rank -- averages them over the
    steps since the last read and over ranks with one all_reduce, and stops the run, naming the step and the last
    finite loss, if a loss or a gradient norm was not finite (fp16: the loss only; its GradScaler skips steps
    whose gradients overflow and lowers its scale). No checkpoint is written between two reads, so a
    non-finite step never reaches one. With skip_nonfinite > 0, add() instead checks every step on the host and
    tells the loop to skip a non-finite one, at most skip_nonfinite times in a run."""

    def __init__(self, out_dir, precision="bf16", skip_nonfinite=0):
        self.out_dir, self.skip_nonfinite = out_dir, skip_nonfinite
        self.checked = ("loss",) if precision == "fp16" else ("loss", "grad_norm")
        self.window = {}  # name -> 0-d tensors, one per step since the last read
        self.kept = []  # one per step since the last read: False for a skipped step (skip_nonfinite only)
        self.epoch_values = {}  # name -> this epoch's per-step values read so far (summed exactly: math.fsum)
        self.skipped, self.last_loss = 0, None

    def add(self, **values):
        """Keep this step's values; returns whether the step may be applied (False: a non-finite step to skip)."""
        values = {name: value.detach().float() for name, value in values.items()}
        keep = True
        if self.skip_nonfinite:  # a host sync per step: the price of skipping
            checked = torch.stack([values[k] for k in self.checked if k in values])
            bad = (~checked.isfinite()).any().float()
            if dist.is_initialized():
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                self.skipped += 1
                if self.skipped > self.skip_nonfinite:
                    raise SystemExit(f"error: more than skip_nonfinite={self.skip_nonfinite} steps had a non-finite "
                                     f"loss or gradient (last finite loss {_number(self.last_loss)}); stopped without "
                                     f"writing a checkpoint, so {self.out_dir} keeps the last good state")
                print(f"warning: skipped a step with a non-finite loss or gradient ({self.skipped} of at most "
                      f"{self.skip_nonfinite})", file=sys.stderr, flush=True)
                keep = False
        for name, value in values.items():
            self.window.setdefault(name, []).append(value)
        self.kept.append(keep)
        return keep

    def read(self, step):
        """{'train/<name>': mean} over the steps since the last read (skipped steps left out: NaN if all were);
        `step` is the number of steps done, as in metrics.jsonl, so the window holds steps step - len + 1, ...,
        step."""
        if not self.window:
            return {}
        names = list(self.window)
        table = torch.stack([torch.stack(self.window.pop(name)) for name in names])  # metrics x steps
        if dist.is_initialized():
            dist.all_reduce(table)
            table /= dist.get_world_size()
        kept, self.kept = torch.tensor(self.kept), []  # the same on every rank: add() agreed on each skip
        steps = (step - table.shape[1] + 1 + torch.arange(table.shape[1]))[kept]
        table = table.cpu()[:, kept]
        finite = torch.stack([table[names.index(k)].isfinite() for k in self.checked if k in names]).all(0)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            losses = table[names.index("loss")][:bad] if "loss" in names else torch.zeros(0)
            last = float(losses[-1]) if len(losses) else self.last_loss
            what = ", ".join(f"{k} {float(table[names.index(k)][bad]):.6g}" for k in self.checked if k in names)
            raise SystemExit(f"error: step {int(steps[bad])} was not finite ({what}; last finite "
                             f"loss {_number(last)}); stopped without writing a checkpoint, so {self.out_dir} keeps "
                             "the last good state. Lower --lr, lengthen --warmup_epochs or try --precision fp32 and "
                             "continue with --resume true, or run again with --skip_nonfinite N to skip such steps "
                             "(docs/troubleshooting.md#nan-or-inf).")
        if "loss" in names and table.shape[1]:
            self.last_loss = float(table[names.index("loss")][-1])
        means = {}
        for name, row in zip(names, table):
            if name not in self.checked:  # fp16's gradient norm: the steps its GradScaler skipped are inf
                row = row[row.isfinite()]
            self.epoch_values.setdefault(name, []).extend(row.tolist())
            means[f"train/{name}"] = float(row.mean()) if len(row) else math.nan
        return {**means, "train/skipped_steps": self.skipped} if self.skip_nonfinite else means

    def read_epoch(self, step):
        """Read what is left of the epoch, then {'train/epoch_<name>': mean over the epoch's steps}: exact sums, so
        the means do not depend on where the reads fell (a resumed run reads at its checkpoint)."""
        self.read(step)
        means = {f"train/epoch_{name}": math.fsum(values) / len(values) if values else math.nan
                 for name, values in self.epoch_values.items()}
        self.epoch_values = {}
        return means

    def state_dict(self):
        """What a checkpoint keeps (after a read): the epoch's values so far, the skipped steps, the last loss."""
        assert not self.window, "read() the metrics before saving them"
        return {"epoch_values": self.epoch_values, "skipped": self.skipped, "last_loss": self.last_loss}

    def load_state_dict(self, state):
        self.epoch_values = {k: list(v) for k, v in state.get("epoch_values", {}).items()}
        self.skipped, self.last_loss = state.get("skipped", 0), state.get("last_loss")


def _number(value):
    return "none yet" if value is None else f"{value:.6g}"
