"""Run plumbing: torchrun detection, the run folder, JSON-lines metrics, atomic checkpoints, RNG states,
and loading a trunk for evaluation from a checkpoint or a plain state_dict."""
import dataclasses
import json
import os
import random
import subprocess
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


def autocast(device, precision):
    """bf16 or fp16 autocast (fp16 only on GPU, where it comes with a GradScaler), or nothing for fp32."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a GPU (its GradScaler is CUDA-only); use --precision bf16 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_run_folder(cfg, resume, is_main, **derived):
    """Create cfg.out_dir and write the resolved config (cfg, derived values, git commit) to config.json and
    to metrics.jsonl; refuse to train over an existing run unless resuming. Returns last.pt's path."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if resume and not os.path.exists(last):
        raise UsageError(f"--resume: no checkpoint {last}; start a new run without --resume")
    if not resume and os.path.exists(last):
        raise UsageError(f"{cfg.out_dir} already holds a run ({last}); pass --resume to continue it, "
                         "or choose another --out_dir")
    if is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        resolved = {**dataclasses.asdict(cfg), **derived, "git_commit": git_commit()}
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        MetricLog(cfg.out_dir, is_main).write(event="config", **resolved)
    return last


def changed_settings(saved, cfg):
    """'key: old -> new' for each config value that differs from the checkpoint's (resume itself aside; a key
    the checkpoint predates, such as a newly added option, is not a change)."""
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k != "resume" and k in saved and saved[k] != v]


class MetricLog:
    """Appends one JSON object per call to out_dir/metrics.jsonl (main rank only)."""

    def __init__(self, out_dir, is_main):
        self.path = os.path.join(out_dir, "metrics.jsonl") if is_main else None

    def write(self, **metrics):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **metrics}) + "\n")


def rng_states():
    """Every generator's state, as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
    that does not fit (another arch, head width or optimizer) is a UsageError naming the file."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"{path} does not fit this run's {type(target).__name__} ({str(e).splitlines()[0]}); "
                         "resume with the settings it was trained with (its config.json)") from None


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
