"""Checkpoints at any step that survive kills, corrupt files and full disks; exact resume (also mid-epoch and on
another number of ranks with the same global batch); and loading a trunk for evaluation from a checkpoint or a
plain state_dict. docs/reliability.md lists what each piece guarantees and the test that proves it."""
import contextlib
import dataclasses
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from common.backbones import backbone_args, build_backbone
from common.config import UsageError
from common.run_folder import RUN_ONLY_KEYS, changed_settings, checkpoint_files, trim_metrics
from common.stopping import EXIT_PREEMPTED, StopSignals


# what a checkpoint of a pre-training holds (Checkpointer.save); "probe", the online probe's state ({} without a
# probe), is there too but not required: a checkpoint without it resumes with a new probe
TRAINING_STATE = {"method", "model", "optimizer", "scaler", "step", "epoch", "config", "schedule", "rng", "metrics",
                  "backbone", "backbone_args"}


class Checkpointer:
    """Checkpoints of a pre-training and its stop signals, so that a run loses at most the steps since its last
    checkpoint and a resumed run is exactly the uninterrupted one.

    Files in cfg.out_dir (written by the main rank, each atomically: a temporary file, fsync, rename):
      step_XXXXXXXX.pt  at every checkpoint; the newest cfg.keep_checkpoints are kept
      last.pt           the newest checkpoint (a hard link to its step file, a copy where links are not allowed)
      epoch_XXXX.pt     at the end of every cfg.snapshot_every-th epoch and of the last one; never deleted
    When: due(step) after every step -- every cfg.checkpoint_every_steps steps, every cfg.checkpoint_every_minutes
    (rank 0's clock), and after SIGTERM or SIGUSR1 on any rank -- and save(step) at the end of every epoch.
    After a stop signal, save() exits with EXIT_PREEMPTED (StopSignals).
    resume() loads the newest intact checkpoint; a truncated or corrupt one is named and passed over."""

    def __init__(self, cfg, schedule, model, optimizer, scaler, metrics, probe, device, rank, world_size):
        self.cfg, self.schedule, self.device = cfg, schedule, device
        self.model, self.optimizer, self.scaler, self.metrics, self.probe = model, optimizer, scaler, metrics, probe
        self.is_main, self.rank, self.world_size = rank == 0, rank, world_size
        self.last_pt = os.path.join(cfg.out_dir, "last.pt")
        self.saved_at = time.time()
        self.stopping = False
        self.signals = StopSignals(cfg.stop_timeout, rank, world_size, cfg.dist_timeout)

    def due(self, step):
        """Whether this step ends with a checkpoint: the same answer on every rank (the flags are all-reduced
        between the hosts every step, a few microseconds with gloo). The epoch's last step is left to the
        end-of-epoch save, which exits after a stop signal too, once the epoch is logged."""
        timed = (self.is_main and self.cfg.checkpoint_every_minutes > 0
                 and time.time() - self.saved_at >= 60 * self.cfg.checkpoint_every_minutes)
        stop, timed = self.signals.agree(timed)
        if stop and not self.stopping and self.is_main:
            print(f"{self.signals.signal or 'a stop signal on another rank'}: writing a checkpoint after step {step}, "
                  f"then exiting with status {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        self.stopping = stop
        every = self.cfg.checkpoint_every_steps
        periodic = (every > 0 and step % every == 0) or timed
        return (self.stopping or periodic) and step % self.schedule["steps_per_epoch"] != 0

    def kept_backbone(self):
        """The trunk that evaluation measures: the model's `kept_backbone` where it names one (DINO: its teacher's),
        else its `backbone`."""
        return getattr(self.model, "kept_backbone", self.model.backbone)

    def save(self, step):
        """Call on every rank after metrics.read(step) (which stops the run on a non-finite loss): write the
        checkpoint of `step`, prune old step files, and exit with EXIT_PREEMPTED if a stop signal came.
        Non-finite weights or optimizer state are never written; nor is anything if the write fails (a full
        disk): the run stops with the newest checkpoint as it was."""
        tensors = [*self.model.state_dict().values(), *(t for s in self.optimizer.state.values()
                                                        for t in s.values() if isinstance(t, torch.Tensor))]
        finite = torch.stack([t.isfinite().all().to(self.device) for t in tensors if t.is_floating_point()])
        finite = finite.all().float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise SystemExit(f"error: the weights or the optimizer state are not finite after step {step}; stopped "
                             f"without writing a checkpoint, so {self.cfg.out_dir} keeps the last good state. Lower "
                             "--lr, lengthen --warmup_epochs or try --precision fp32, and continue with --resume true "
                             "(docs/troubleshooting.md#nan-or-inf).")
        spe = self.schedule["steps_per_epoch"]
        error = ""
        if self.is_main:
            state = {"method": type(self.model).__name__, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": step, "epoch": step // spe, "config": dataclasses.asdict(self.cfg),
                     "schedule": self.schedule, "rng": rng_states(self.device), "metrics": self.metrics.state_dict(),
                     "probe": self.probe.state_dict(), "backbone": self.kept_backbone().state_dict(),
                     "backbone_args": self.model.backbone_args}
            try:
                self._write(state, step, epoch=step // spe if step % spe == 0 else 0)
            except (OSError, RuntimeError) as e:  # torch.save reports some failed writes as RuntimeError
                error = f"could not write a checkpoint in {self.cfg.out_dir} ({getattr(e, 'strerror', None) or e})"
        failed = torch.tensor([float(bool(error))], device=finite.device)  # NCCL reduces GPU tensors only
        if dist.is_initialized():
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise SystemExit(f"error: {error or 'rank 0 could not write its checkpoint'}; stopped, and the checkpoints "
                             "already written are intact. Free space (or fix the folder), then run again to resume.")
        self.saved_at = time.time()
        if self.stopping:
            self.signals.exit_after_checkpoint(f"{self.last_pt} at step {step}", self.is_main)

    def _write(self, state, step, epoch):
        folder = self.cfg.out_dir
        os.makedirs(folder, exist_ok=True)
        step_file = os.path.join(folder, f"step_{step:08d}.pt")
        save_checkpoint(state, step_file)
        _link_or_copy(step_file, self.last_pt)
        if epoch and (epoch % self.cfg.snapshot_every == 0 or epoch == self.cfg.epochs):
            _link_or_copy(step_file, os.path.join(folder, f"epoch_{epoch:04d}.pt"))
        old = sorted(n for n in os.listdir(folder) if re.fullmatch(r"step_\d+\.pt", n))[:-self.cfg.keep_checkpoints]
        for name in old:
            os.remove(os.path.join(folder, name))

    def resume(self):
        """Continue the run in cfg.out_dir, if it holds one and cfg.resume allows: load the newest intact
        checkpoint into the model (with its buffers: EMA targets, queues, centres), the optimizer, the scaler,
        the metrics, the online probe and the random generators, after checking that it is a checkpoint of this
        method and backbone, that the settings match (auto; true reports the changed ones and applies them),
        that the schedule continues (check_schedule) and that every rank found the same step. The optimizer keeps
        this run's group settings. Returns the step to continue from: 0 for a new run."""
        cfg = self.cfg
        if self.is_main and os.path.isdir(cfg.out_dir):
            for name in os.listdir(cfg.out_dir):  # what a killed run was writing
                if name.endswith(".pt.tmp"):
                    os.remove(os.path.join(cfg.out_dir, name))
        step = self._load_newest() if cfg.resume != "false" else 0
        if self.world_size > 1:  # a folder each node sees its own copy of, or a stale listing, would split them
            steps = torch.tensor([float(step), -float(step)])
            dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.signals.group)
            if steps[0] != -steps[1]:
                raise UsageError(f"the ranks found different checkpoints in {cfg.out_dir} (steps {int(-steps[1])} to "
                                 f"{int(steps[0])}): out_dir must be one folder that every rank sees")
        return step

    def _load_newest(self):
        cfg, is_main = self.cfg, self.is_main
        ckpt, path, unreadable = None, None, []
        for candidate in checkpoint_files(cfg.out_dir):
            try:
                ckpt = load_checkpoint(candidate)
                if not (isinstance(ckpt, dict) and TRAINING_STATE <= ckpt.keys()):
                    raise UsageError(f"{candidate} is not a training checkpoint of these scripts")
                path = candidate
                break
            except UsageError as e:
                unreadable.append((candidate, str(e)))
        if path is None and unreadable:
            raise UsageError(f"every checkpoint in {cfg.out_dir} is unreadable ({unreadable[0][1]}); move them away "
                             "to start a new run there")
        if path is None:
            return 0
        if unreadable and is_main:
            print(f"warning: {'; '.join(e for _, e in unreadable)}. Resuming from {path}, the newest intact "
                  "checkpoint", file=sys.stderr, flush=True)
        method, args = type(self.model).__name__, self.model.backbone_args
        held = ckpt["method"], ckpt["backbone_args"]
        if held != (method, args):
            raise UsageError(f"{path} holds a run of {_describe(*held)}; this run is {_describe(method, args)}. "
                             "Resume it with the script and settings it was trained with (its config.json), or "
                             "choose another --out_dir")
        changed = changed_settings(ckpt["config"], cfg)
        if cfg.resume == "auto":
            # batch_size is per rank: another split of the same global batch (another number of ranks) is the
            # same run, and check_schedule refuses another global batch
            differing = changed_settings(ckpt["config"], cfg, ignore=(*RUN_ONLY_KEYS, "batch_size"))
            if differing:
                raise UsageError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(differing)}); pass "
                                 "--resume true to continue it with these, or choose another --out_dir")
        check_schedule(ckpt["schedule"], self.schedule, path)
        load_state(self.model, ckpt["model"], path)
        load_state(self.optimizer, ckpt["optimizer"], path)
        if ckpt["scaler"] or not self.scaler.is_enabled():
            load_state(self.scaler, ckpt["scaler"], path)
        elif is_main:  # precision auto: bf16 where the run started, fp16 on this GPU
            print("the checkpoint has no GradScaler state (it computed in bf16 or fp32): fp16 starts a fresh one",
                  flush=True)
        self.metrics.load_state_dict(ckpt["metrics"])
        self.probe.load_state_dict(ckpt.get("probe", {}), path)  # none in a run that had no probe
        set_rng_states(ckpt["rng"], self.device)
        if is_main:
            if changed:  # e.g. a longer --epochs reshapes the schedule
                print(f"resuming with changed settings: {'; '.join(changed)}", flush=True)
            print(f"resuming from {path} at step {ckpt['step']}", flush=True)
            trim_metrics(cfg.out_dir, ckpt["step"])
            for candidate, _ in unreadable:  # kept for a look, out of the way of pruning and of the next resume
                if os.path.basename(candidate).startswith("step_"):
                    os.replace(candidate, f"{candidate}.corrupt")
        return ckpt["step"]


def check_schedule(saved, schedule, path):
    """A run continues exactly where its schedule does: steps per epoch, and with them total steps, the peak lr
    and every per-step schedule, are functions of the global batch and the data, not of how the batch is split
    over ranks. Another split of the same global batch is the same run; another global batch or another number
    of steps per epoch is an error. (A changed --epochs or --lr is the user's choice: it takes effect and is
    reported among the changed settings.)"""
    if saved["global_batch"] != schedule["global_batch"]:
        g, world = saved["global_batch"], schedule["world_size"]
        hint = f"--batch_size {g // world} on {world} ranks" if g % world == 0 else f"batch_size x ranks = {g}"
        raise UsageError(f"{path} was trained with a global batch of {g} ({saved['world_size']} ranks x "
                         f"{g // saved['world_size']}); this run's is {schedule['global_batch']} ({world} x "
                         f"{schedule['global_batch'] // world}), which would change its schedule. Resume with "
                         f"{hint}, or start a new run in another --out_dir")
    if saved["steps_per_epoch"] != schedule["steps_per_epoch"]:
        raise UsageError(f"{path} was trained with {saved['steps_per_epoch']} steps per epoch; this run's data "
                         f"give {schedule['steps_per_epoch']}. Resume with the dataset and --subset it was "
                         "trained with (its config.json)")


def _describe(method, args):
    return f"{method} with a {args.get('arch')} at {args.get('image_size')} px" + (
        f" (patch {args['patch_size']})" if str(args.get("arch", "")).startswith("vit") else "")


def save_checkpoint(state, path):
    """Atomic and durable: write a temporary file, flush it to disk, rename it over `path` and flush the folder,
    so neither a kill nor a crash nor a full disk ever leaves half a file under `path` (a failed write removes its
    temporary file and raises)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    _fsync_folder(path)


def load_checkpoint(path):
    """Load a checkpoint on CPU with weights_only=True; a missing or corrupt file is a clear error."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects we do not load
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "it is corrupt or not a checkpoint of these scripts") from None


def load_state(target, state, path):
    """target.load_state_dict(state) (strict) for a model, optimizer or scaler being resumed; a checkpoint
    that does not fit (another arch, head width or optimizer) is a UsageError naming the file. An optimizer
    takes its state (momentum buffers) from the checkpoint but keeps its own group settings (weight decay,
    lr_ratio, ...), which torch's load_state_dict would otherwise replace with the saved ones."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in getattr(target, "param_groups", [])]
    if settings and len(state["param_groups"]) != len(settings):
        raise UsageError(f"{path} holds {len(state['param_groups'])} optimizer parameter groups where this script "
                         f"builds {len(settings)}: it was written by another version of the script. Resume it with "
                         "the commit named in its config.json (git_commit), or start a new run")
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"{path} does not fit this run's {type(target).__name__} ({str(e).splitlines()[0]}); "
                         "resume with the settings it was trained with (its config.json)") from None
    for group, own in zip(getattr(target, "param_groups", []), settings):
        group.update(own)


def _link_or_copy(src, dst):
    """Make dst the same file as src, atomically and durably: a hard link (no copy) where the file system
    allows it, else a copy flushed to disk."""
    tmp = f"{dst}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_folder(dst)


def _fsync_folder(path):
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def rng_states(device):
    """The generators a run may draw from, as tensors and plain values (loadable with weights_only=True):
    torch's on the CPU and on this rank's GPU only (one state per visible GPU would not load where fewer are
    visible), Python's and NumPy's."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    cuda = states["cuda"]
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _mismatch(model, state, limit=3):
    """One line listing how `state` differs from `model`'s state_dict (missing, unexpected, wrong shape)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches, file vs model", shapes)) if keys]
    return "; ".join(parts)


def load_backbone(path, arch="", image_size=0, cifar_stem="", patch_size=0):
    """Rebuild a trunk and load its weights (strict) from a method script's checkpoint (its "backbone" and
    "backbone_args") or from a plain trunk state_dict. Non-empty arguments override the checkpoint's
    backbone_args; a plain state_dict needs at least arch and image_size (cifar_stem: auto, patch_size: 16).
    Returns (backbone, width, backbone_args, training config dict or {})."""
    obj = load_checkpoint(path)
    is_checkpoint = isinstance(obj, dict) and isinstance(obj.get("backbone"), dict)
    if not is_checkpoint and not (isinstance(obj, dict) and obj
                                  and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UsageError(f"{path} is neither a checkpoint of these scripts nor a state_dict of tensors")
    state = obj["backbone"] if is_checkpoint else obj
    train_config = obj.get("config", {}) if is_checkpoint else {}
    stored = dict(obj.get("backbone_args") or {}) if is_checkpoint else {}
    overrides = {"arch": arch, "image_size": image_size, "cifar_stem": cifar_stem, "patch_size": patch_size}
    args = {**stored, **{k: v for k, v in overrides.items() if v}}
    if "arch" not in args or "image_size" not in args:
        what = "the checkpoint has no backbone_args" if is_checkpoint else "it holds only weights"
        raise UsageError(f"cannot tell how to build the backbone of {path} ({what}); pass --arch and "
                         "--image_size (and --cifar_stem, --patch_size where they differ from auto, 16)")
    args = backbone_args(args["arch"], args["image_size"], args.get("cifar_stem", "auto"),
                         args.get("patch_size", 16))
    backbone, width = build_backbone(**args)
    problem = _mismatch(backbone, state)
    if problem:
        built = ", ".join(f"{k}={v}" for k, v in args.items())
        if stored:  # a checkpoint overridden by --arch, --image_size, ...: say what it holds
            held = ", ".join(f"{k}={v}" for k, v in stored.items())
            raise UsageError(f"{path} holds the trunk of a {obj.get('method', 'pre-training')} run with {held}; the "
                             f"options ask for {built}, which its weights do not fit ({problem}). Leave out --arch, "
                             "--image_size, --cifar_stem and --patch_size to use the checkpoint's")
        raise UsageError(f"the weights in {path} do not fit the backbone {built}: {problem}. Check --arch, "
                         "--image_size, --cifar_stem and --patch_size; a plain state_dict must hold the trunk "
                         "only (no fc.* / heads.*)")
    backbone.load_state_dict(state, strict=True)
    return backbone, width, args, train_config
