"""Run plumbing that carries no method knowledge: torchrun detection, precision, the run folder (config.json,
metrics.jsonl), per-step metrics kept on the device, atomic checkpoints, exact resume (also on another number
of ranks), and loading a trunk for evaluation from a checkpoint or a plain state_dict."""
import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from common.backbones import backbone_args, build_backbone
from common.config import UsageError


def init_distributed():
    """One code path with or without torchrun. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return rank, world_size, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return rank, world_size, torch.device("cpu")


def close_distributed():
    """Wait for every rank, then tear the process group down (nothing to do without torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision, device):
    """The precision a run computes in: `auto` is bf16 where the device has it natively (CPUs; NVIDIA A100,
    H100 and later), else fp16 with a GradScaler (V100, T4, where bf16 would be emulated and slow)."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        native_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native_bf16 else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a GPU (its GradScaler is CUDA-only); use --precision bf16 or auto on CPU")
    return precision


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


def check_run(cfg):
    """Check a pre-training's run settings and its folder before anything is loaded or written: never train
    over an existing run unless resuming, never resume what is not there. Returns last.pt's path."""
    for key in ("epochs", "batch_size", "log_every", "snapshot_every"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.knn_every < 0 or cfg.warmup_epochs < 0:
        raise UsageError("knn_every and warmup_epochs must not be negative")
    last = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume and not os.path.exists(last):
        raise UsageError(f"--resume: no checkpoint {last}; start a new run without --resume")
    if not cfg.resume and os.path.exists(last):
        raise UsageError(f"{cfg.out_dir} already holds a run ({last}); pass --resume to continue it, "
                         "or choose another --out_dir")
    return last


def write_run_config(cfg, is_main, **derived):
    """Create cfg.out_dir and write the resolved config (cfg, derived values, git commit) to config.json and as
    a line of metrics.jsonl (one per start, so a resumed run keeps the history of its settings). Called once
    the run has started (and a resume has succeeded), so a refused start leaves config.json as it was."""
    if is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        resolved = {**dataclasses.asdict(cfg), **derived, "git_commit": git_commit()}
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        MetricLog(cfg.out_dir, is_main).write(event="config", **resolved)


def changed_settings(saved, cfg):
    """'key: old -> new' for each config value that differs from the checkpoint's (resume itself aside; a key
    the checkpoint predates, such as a newly added option, is not a change)."""
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k != "resume" and k in saved and saved[k] != v]


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


def resume_training(path, cfg, schedule, model, optimizer, scaler, device, is_main):
    """Continue the run in cfg.out_dir: load last.pt into the model (with its buffers: EMA targets, queues,
    centres), the optimizer's state and the scaler (strict), check that the schedule continues (check_schedule)
    and restore the random generators (the main rank's saved states, on every rank). The optimizer keeps this
    run's settings (weight decay, momentum, ...), so a changed setting takes effect. Returns (step, epoch)."""
    ckpt = load_checkpoint(path)
    check_schedule(ckpt.get("schedule"), schedule, path, is_main)
    load_state(model, ckpt["model"], path)
    load_state(optimizer, ckpt["optimizer"], path)
    if ckpt["scaler"] or not scaler.is_enabled():
        load_state(scaler, ckpt["scaler"], path)
    elif is_main:  # precision auto: bf16 where the run started, fp16 on this GPU
        print("the checkpoint has no GradScaler state (it computed in bf16 or fp32): fp16 starts a fresh one",
              flush=True)
    set_rng_states(ckpt["rng"], device)
    changed = changed_settings(ckpt["config"], cfg)  # e.g. a longer --epochs reshapes the schedule
    if is_main and changed:
        print(f"resuming with changed settings: {'; '.join(changed)}", flush=True)
    return ckpt["step"], ckpt["epoch"]


def save_training_state(path, cfg, schedule, step, epoch, model, optimizer, scaler, device, is_main):
    """Call on every rank at the end of an epoch: the main rank writes last.pt (atomically), and also
    epoch_XXXX.pt every cfg.snapshot_every epochs and at the end. The model must have `backbone` and
    `backbone_args`; its trunk is stored on its own too, as a plain state_dict for evaluation.
    Non-finite weights or optimizer state (a NaN momentum buffer of a group at lr 0 leaves the weights finite)
    are never written: the run stops instead, and the last good checkpoint stays."""
    tensors = [*model.state_dict().values(), *(t for s in optimizer.state.values() for t in s.values()
                                               if isinstance(t, torch.Tensor))]
    finite = torch.stack([t.isfinite().all() for t in tensors if t.is_floating_point()]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise SystemExit(f"error: the weights or the optimizer state are not finite after step {step} (epoch {epoch}); "
                         f"stopped without writing a checkpoint, so {path} keeps the last good state. Lower --lr, "
                         "lengthen --warmup_epochs or try --precision fp32, then --resume.")
    if not is_main:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "epoch": epoch, "config": dataclasses.asdict(cfg), "schedule": schedule,
             "rng": rng_states(device), "backbone": model.backbone.state_dict(),
             "backbone_args": model.backbone_args}
    save_checkpoint(state, path)
    if epoch % cfg.snapshot_every == 0 or epoch == cfg.epochs:
        save_checkpoint(state, os.path.join(os.path.dirname(path), f"epoch_{epoch:04d}.pt"))


class MetricLog:
    """Appends one JSON object per call to out_dir/metrics.jsonl (main rank only)."""

    def __init__(self, out_dir, is_main):
        self.path = os.path.join(out_dir, "metrics.jsonl") if is_main else None

    def write(self, **metrics):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **metrics}) + "\n")


class StepMetrics:
    """Per-step scalars of the training loop (the loss, a collapse monitor), kept on the device: the loop never
    reads a value back, which on a GPU would stall its launch queue every step (fp16's GradScaler still checks
    its gradients for inf on the host every step; bf16 and fp32 never wait). read() -- every log_every steps
    and at the end of an epoch, on every rank -- averages them over the steps since the last read and over
    ranks with one all_reduce, and stops the run, naming the step, if a loss was not finite. Between two reads
    no checkpoint is written, so a non-finite loss never reaches one."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.window = {}  # name -> 0-d tensors, one per step since the last read
        self.epoch_totals = {}  # name -> [sum, count] over the steps read this epoch

    def add(self, **values):
        for name, value in values.items():
            self.window.setdefault(name, []).append(value.detach().float())

    def read(self, step):
        """{'train/<name>': mean} over the steps since the last read; `step` is the number of steps done, as in
        metrics.jsonl, so the window holds steps step - len + 1, ..., step."""
        if not self.window:
            return {}
        names = list(self.window)
        table = torch.stack([torch.stack(self.window.pop(name)) for name in names])  # metrics x steps
        if dist.is_initialized():
            dist.all_reduce(table)
            table /= dist.get_world_size()
        table = table.cpu()
        if "loss" in names:
            losses = table[names.index("loss")]
            bad = (~losses.isfinite()).nonzero().flatten().tolist()
            if bad:
                raise SystemExit(f"error: loss is {float(losses[bad[0]])} at step {step - len(losses) + 1 + bad[0]}; "
                                 f"stopped without writing a checkpoint, so {os.path.join(self.out_dir, 'last.pt')} "
                                 "keeps the last good state. Lower --lr, lengthen --warmup_epochs or try --precision "
                                 "fp32, then --resume.")
        for name, row in zip(names, table):
            total = self.epoch_totals.setdefault(name, [0.0, 0])
            total[0] += float(row.sum())
            total[1] += len(row)
        return {f"train/{name}": float(row.mean()) for name, row in zip(names, table)}

    def read_epoch(self, step):
        """Read what is left of the epoch, then {'train/epoch_<name>': mean over the epoch's steps}."""
        self.read(step)
        means = {f"train/epoch_{name}": total / count for name, (total, count) in self.epoch_totals.items()}
        self.epoch_totals = {}
        return means


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
    """Atomic: write a temporary file, then rename it over `path`, so a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        raise UsageError(f"the weights in {path} do not fit the backbone {built}: {problem}. Check --arch, "
                         "--image_size, --cifar_stem and --patch_size; a plain state_dict must hold the trunk "
                         "only (no fc.* / heads.*)")
    backbone.load_state_dict(state, strict=True)
    return backbone, width, args, train_config
