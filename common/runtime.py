"""Run plumbing that carries no method knowledge: torchrun detection (with a collective timeout), precision, the
run folder (config.json, metrics.jsonl), per-step metrics kept on the device, checkpoints at any step that
survive kills, corrupt files and full disks, stop signals, exact resume (also mid-epoch and on another number
of ranks), and loading a trunk for evaluation from a checkpoint or a plain state_dict. docs/reliability.md
lists what each piece guarantees and the test that proves it."""
import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from common.backbones import backbone_args, build_backbone
from common.config import UsageError


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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_bf16_support():
    """(native, what): whether this CPU computes bf16 natively, and the capability that says so. x86 needs
    AVX512-BF16 or AMX (AVX2-only and plain AVX512 parts emulate bf16 autocast, about 30x slower than fp32 for a
    ResNet); ARM needs the BF16 instructions (ARMv8.6: Graviton3, Apple M2 and later)."""
    capability = torch.backends.cpu.get_cpu_capability()  # the SIMD level torch's own kernels use
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # asks cpuinfo for ARM's BF16 extension
        except (AttributeError, RuntimeError):  # a build without oneDNN
            native = False
        return native, f"ARM {capability}, {'with' if native else 'without'} BF16 instructions"
    for native, what in ((torch.cpu._is_amx_tile_supported(), "AMX"),
                         (torch.cpu._is_avx512_bf16_supported(), "AVX512-BF16")):
        if native:
            return True, f"{capability} with {what}"
    return False, f"{capability} without AVX512-BF16 or AMX"


def resolve_precision(precision, device, is_main=True):
    """The precision a run computes in, and why. `auto`: bf16 where the device computes it natively (NVIDIA A100,
    H100 and later; CPUs with AVX512-BF16, AMX or ARM's BF16), else fp16 with a GradScaler on a GPU (V100, T4)
    and fp32 on a CPU (where bf16 is emulated and many times slower). The main process prints the choice once;
    a bf16 forced on a CPU without it runs, with a warning."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a GPU (its GradScaler is CUDA-only); use --precision auto, bf16 or fp32 on CPU")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        hardware = f"this GPU {'computes' if native else 'does not compute'} bf16 natively"
    else:
        native, capability = cpu_bf16_support()
        hardware = f"this CPU ({capability}) {'computes' if native else 'does not compute'} bf16 natively"
    if precision == "auto":
        chosen = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
        reason = f"auto: {hardware}"
    else:
        chosen, reason = precision, f"asked for: {hardware}"
    if is_main:
        print(f"precision: {chosen} ({reason})", flush=True)
        if chosen == "bf16" and not native:
            print(f"warning: precision bf16 on a device without native bf16 ({hardware}): it is emulated, many "
                  "times slower than fp32; use --precision auto", file=sys.stderr, flush=True)
    return chosen, reason


def to_device(x, device):
    """A host tensor on `device` without making the host wait: on a GPU, from pinned memory, non-blocking (the
    pinned block is kept until the copy is done)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device, non_blocking=True)


def autocast(device, precision):
    """The autocast context of a resolved precision (resolve_precision): bf16, fp16, or none for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RESUME_MODES = ("auto", "true", "false")
# exit statuses besides 0 (done) and 1 (an error, with its message)
EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: a checkpoint of the last step was written; run the same command again
EXIT_FORCED = 76  # a second signal, or no checkpoint within stop_timeout: exited without one
EXIT_LOST_RANK = 77  # another process of the job died or did not answer within dist_timeout
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and spot-instance agents send before a kill
# the same signal again within this many seconds is the first one twice: SLURM signals every process of a job,
# and torchrun forwards what it gets to its workers
DUPLICATE_SIGNAL_S = 3.0
# settings that change how a run is carried out, not what it computes: `resume: auto` continues a run even
# where they differ (a re-queued job on another node, with more data workers, a new data path, ...)
RUN_ONLY_KEYS = ("resume", "out_dir", "data_dir", "download", "num_workers", "compile", "log_every", "knn_every",
                 "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints", "stop_timeout",
                 "dist_timeout", "bad_images", "skip_nonfinite")


def check_run(cfg):
    """Check a pre-training's run settings and its folder before anything is loaded or written: the folder can be
    written to, and it holds a run exactly when cfg.resume allows (auto: either; true: it must; false: it
    must not), so a run is never trained over and a resume never starts from nothing."""
    for key in ("epochs", "batch_size", "log_every", "snapshot_every", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("knn_every", "warmup_epochs", "checkpoint_every_steps", "checkpoint_every_minutes",
                "skip_nonfinite"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"{key} must not be negative, got {getattr(cfg, key)}")
    for key in ("stop_timeout", "dist_timeout"):
        if getattr(cfg, key) <= 0:
            raise UsageError(f"{key} must be a positive number of seconds, got {getattr(cfg, key)}")
    if cfg.resume not in RESUME_MODES:
        raise UsageError(f"resume must be auto, true or false, got {cfg.resume!r}")
    found = checkpoint_files(cfg.out_dir)
    if cfg.resume == "true" and not found:
        raise UsageError(f"--resume true: {cfg.out_dir} holds no checkpoint; start a new run with --resume auto")
    if cfg.resume == "false" and found:
        raise UsageError(f"{cfg.out_dir} already holds a run ({os.path.basename(found[0])}); pass --resume auto "
                         "(or true) to continue it, or choose another --out_dir")
    _check_writable(cfg.out_dir)


def _check_writable(folder):
    """Write and remove a file where the run folder is (or would be created): a read-only or full file system,
    a missing permission or a path through a file is found before training, not at the first checkpoint."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write_test_")
        try:  # data blocks, not just a name: a full disk fails here
            os.write(fd, bytes(2**20))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write the run folder {folder} ({e.strerror or e}); choose another "
                         "--out_dir") from None


def checkpoint_files(folder):
    """The checkpoints in a run folder, the one to resume from first: step_XXXXXXXX.pt newest first (the newest
    is last.pt's file, or newer if a kill came between writing it and linking last.pt), last.pt (a run of an
    earlier version has no step files), then the epoch_XXXX.pt snapshots, newest first."""
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    steps = sorted((n for n in names if re.fullmatch(r"step_\d+\.pt", n)), reverse=True)
    epochs = sorted((n for n in names if re.fullmatch(r"epoch_\d+\.pt", n)), reverse=True)
    return [os.path.join(folder, n) for n in steps + (["last.pt"] if "last.pt" in names else []) + epochs]


def write_run_config(cfg, is_main, **derived):
    """Create cfg.out_dir and write the resolved config (cfg, derived values, git commit) to config.json and as
    a line of metrics.jsonl (one per start, so a resumed run keeps the history of its settings). Called once
    the run has started (and a resume has succeeded), so a refused start leaves config.json as it was."""
    if is_main:
        resolved = {**dataclasses.asdict(cfg), **derived, "git_commit": git_commit()}
        try:
            write_json(resolved, os.path.join(cfg.out_dir, "config.json"))  # atomic, and creates the folder
        except OSError as e:
            raise SystemExit(f"error: could not write {cfg.out_dir}/config.json ({e.strerror or e})") from None
        MetricLog(cfg.out_dir, is_main).write(event="config", **resolved)


def changed_settings(saved, cfg, ignore=("resume",)):
    """'key: old -> new' for each config value that differs from the checkpoint's (keys in `ignore` aside; a key
    the checkpoint predates, such as a newly added option, is not a change)."""
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in ignore and k in saved and saved[k] != v]


def check_schedule(saved, schedule, path, is_main=True):
    """A run continues exactly where its schedule does: steps per epoch, and with them total steps, the peak lr
    and every per-step schedule, are functions of the global batch and the data, not of how the batch is split
    over ranks. Another split of the same global batch is the same run; another global batch or another number
    of steps per epoch is an error. (A changed --epochs or --lr is the user's choice: it takes effect and is
    reported among the changed settings.)"""
    if not saved:
        if is_main:
            print(f"warning: {path} predates the schedule check (it holds no 'schedule'); resume it with the "
                  "global batch it was trained with", file=sys.stderr, flush=True)
        return
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

    def __init__(self, cfg, schedule, model, optimizer, scaler, metrics, device, rank, world_size):
        self.cfg, self.schedule, self.device = cfg, schedule, device
        self.model, self.optimizer, self.scaler, self.metrics = model, optimizer, scaler, metrics
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
                             "--lr, lengthen --warmup_epochs or try --precision fp32, and continue with --resume true.")
        spe = self.schedule["steps_per_epoch"]
        error = ""
        if self.is_main:
            state = {"method": type(self.model).__name__, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": step, "epoch": step // spe, "config": dataclasses.asdict(self.cfg),
                     "schedule": self.schedule, "rng": rng_states(self.device), "metrics": self.metrics.state_dict(),
                     "backbone": self.kept_backbone().state_dict(), "backbone_args": self.model.backbone_args}
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
        the metrics and the random generators, after checking that it is a checkpoint of this method and
        backbone, that the settings match (auto; true reports the changed ones and applies them), that the
        schedule continues (check_schedule) and that every rank found the same step. The optimizer keeps this
        run's group settings. Returns the step to continue from: 0 for a new run."""
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
                if not (isinstance(ckpt, dict) and {"model", "optimizer", "step", "config"} <= ckpt.keys()):
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
        held = ckpt.get("method", method), ckpt.get("backbone_args") or args
        if held != (method, args):
            raise UsageError(f"{path} holds a run of {_describe(*held)}; this run is {_describe(method, args)}. "
                             "Resume it with the script and settings it was trained with (its config.json), or "
                             "choose another --out_dir")
        changed = changed_settings(ckpt["config"], cfg)
        if cfg.resume == "auto":
            differing = changed_settings(ckpt["config"], cfg, ignore=RUN_ONLY_KEYS)
            if differing:
                raise UsageError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(differing)}); pass "
                                 "--resume true to continue it with these, or choose another --out_dir")
        check_schedule(ckpt.get("schedule"), self.schedule, path, is_main)
        load_state(self.model, ckpt["model"], path)
        load_state(self.optimizer, ckpt["optimizer"], path)
        if ckpt["scaler"] or not self.scaler.is_enabled():
            load_state(self.scaler, ckpt["scaler"], path)
        elif is_main:  # precision auto: bf16 where the run started, fp16 on this GPU
            print("the checkpoint has no GradScaler state (it computed in bf16 or fp32): fp16 starts a fresh one",
                  flush=True)
        self.metrics.load_state_dict(ckpt.get("metrics") or {})
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


def _number(value):
    return "none yet" if value is None else f"{value:.6g}"


def _say(message):
    os.write(2, f"{message}\n".encode())


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


def trim_metrics(out_dir, step):
    """Drop the lines of metrics.jsonl after `step`: the steps a killed run did after its last checkpoint, which
    the resumed run does again."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _step_of(line):
    """The step of a metrics.jsonl line (0 for config lines), or infinity for a line a kill cut off."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


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
              "checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_RANK)  # not SystemExit: tearing down a broken process group can hang


class MetricLog:
    """Appends one JSON object per call to out_dir/metrics.jsonl (main rank only)."""

    def __init__(self, out_dir, is_main):
        self.path = os.path.join(out_dir, "metrics.jsonl") if is_main else None

    def write(self, **metrics):
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), **metrics}) + "\n")
            except OSError as e:  # a full disk: stop in one line (the other ranks then lose this one: status 77)
                raise SystemExit(f"error: could not write {self.path} ({e.strerror or e}); the checkpoints "
                                 "already written are intact. Free space (or fix the folder), then run again to "
                                 "resume.") from None


    def report_paths(self):
        """At the end of a run (main rank): where its checkpoints and metrics are, and the command to plot them."""
        if self.path:
            folder = os.path.dirname(self.path)
            print(f"done: checkpoints in {folder} (last.pt is the newest), metrics in {self.path}; plot them with "
                  f"python tools/plot_metrics.py {folder}", flush=True)


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
                             "continue with --resume true, or run again with --skip_nonfinite N to skip such steps.")
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
    cuda = states.get("cuda")
    if isinstance(cuda, (list, tuple)):  # checkpoints before this fix: one state per visible GPU, rank 0's first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


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


def write_json(obj, path):
    """Atomic, like save_checkpoint: a temporary file renamed over `path` (parent folders are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
