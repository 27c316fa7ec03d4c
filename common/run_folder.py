"""The run folder of a pre-training: its checks before anything is written (check_run), config.json, metrics.jsonl
(MetricLog; trimmed back to the checkpoint on resume), and the checkpoint files it holds."""
import dataclasses
import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import tempfile
import time

from common.config import UsageError


RESUME_MODES = ("auto", "true", "false")
# settings that change how a run is carried out, not what it computes: `resume: auto` continues a run even
# where they differ (a re-queued job on another node, with more data workers, a new data path, ...)
RUN_ONLY_KEYS = ("resume", "out_dir", "data_dir", "download", "num_workers", "compile", "log_every", "knn_every",
                 "probe_every", "probe_lr", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
                 "snapshot_every", "stop_timeout", "dist_timeout", "bad_images", "skip_nonfinite", "logger")


def check_run(cfg):
    """Check a pre-training's run settings and its folder before anything is loaded or written: the folder can be
    written to, and it holds a run exactly when cfg.resume allows (auto: either; true: it must; false: it
    must not), so a run is never trained over and a resume never starts from nothing."""
    for key in ("epochs", "batch_size", "log_every", "snapshot_every", "keep_checkpoints"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("knn_every", "probe_every", "warmup_epochs", "checkpoint_every_steps", "checkpoint_every_minutes",
                "skip_nonfinite"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"{key} must not be negative, got {getattr(cfg, key)}")
    if cfg.probe_lr <= 0:
        raise UsageError(f"probe_lr must be positive, got {cfg.probe_lr}")
    for key in ("stop_timeout", "dist_timeout"):
        if getattr(cfg, key) <= 0:
            raise UsageError(f"{key} must be a positive number of seconds, got {getattr(cfg, key)}")
    if cfg.resume not in RESUME_MODES:
        raise UsageError(f"resume must be auto, true or false, got {cfg.resume!r}")
    check_logger(cfg.logger)
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
    is last.pt's file, or newer if a kill came between writing it and linking last.pt), last.pt (alone in a
    folder it was copied into), then the epoch_XXXX.pt snapshots, newest first."""
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
    """'key: old -> new' for each config value that differs from the checkpoint's (keys in `ignore` aside), a key
    only one of them has included: a setting renamed or added since the checkpoint was written is a change to
    confirm (--resume true), never a default silently taking the place of the run's value."""
    now, changed = dataclasses.asdict(cfg), []
    for k, v in now.items():
        if k not in ignore and k not in saved:
            changed.append(f"{k}: (not in the checkpoint) -> {v!r}")
        elif k not in ignore and saved[k] != v:
            changed.append(f"{k}: {saved[k]!r} -> {v!r}")
    return changed + [f"{k}: {v!r} -> (not a setting of this script)" for k, v in saved.items()
                      if k not in ignore and k not in now]


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(obj, path):
    """Atomic, like save_checkpoint: a temporary file renamed over `path` (parent folders are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


LOGGERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # --logger: the package each needs


def check_logger(logger):
    """A known logger whose package is installed (it is imported only when asked for)."""
    if logger not in LOGGERS:
        raise UsageError(f"logger must be one of {', '.join(LOGGERS)}, got {logger!r}")
    package = LOGGERS[logger]
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"--logger {logger} needs the {package} package: pip install {package} (or --logger none)")


class MetricLog:
    """Appends one JSON object per call to out_dir/metrics.jsonl (main rank only), the run's record; with logger
    tensorboard (event files in out_dir/tensorboard) or wandb (offline with WANDB_MODE=offline; one wandb run
    per run folder, continued on resume) it also sends every numeric value there, at its step."""

    def __init__(self, out_dir, is_main, logger="none"):
        self.path = os.path.join(out_dir, "metrics.jsonl") if is_main else None
        self.logger, self.sink = logger if is_main else "none", None

    def write(self, **metrics):
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), **metrics}) + "\n")
            except OSError as e:  # a full disk: stop in one line (the other ranks then lose this one: status 77)
                raise SystemExit(f"error: could not write {self.path} ({e.strerror or e}); the checkpoints "
                                 "already written are intact. Free space (or fix the folder), then run again to "
                                 "resume.") from None
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k not in ("step", "epoch", "time")}
        if self.logger != "none" and values and "step" in metrics:
            self._send(values, metrics["step"])

    def _send(self, values, step):
        folder = os.path.dirname(self.path)
        if self.logger == "tensorboard":
            if self.sink is None:  # opened at the first value: a refused start leaves the run folder as it was
                from torch.utils.tensorboard import SummaryWriter
                self.sink = SummaryWriter(os.path.join(folder, "tensorboard"))
            for name, value in values.items():
                self.sink.add_scalar(name, value, step)
            self.sink.flush()  # every log_every steps: a killed run keeps what it logged
        else:
            import wandb
            if self.sink is None:
                config = {}
                if os.path.exists(os.path.join(folder, "config.json")):
                    with open(os.path.join(folder, "config.json")) as f:
                        config = json.load(f)
                run_id = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16]  # the same on resume
                self.sink = wandb.init(project=os.environ.get("WANDB_PROJECT", "ssl"), dir=folder, id=run_id,
                                       name=os.path.basename(os.path.abspath(folder)), resume="allow", config=config)
            self.sink.log(values, step=step)


    def report_paths(self):
        """At the end of a run (main rank): where its checkpoints and metrics are, and the command to plot them."""
        if self.sink is not None:  # the logger's files complete
            self.sink.close() if self.logger == "tensorboard" else self.sink.finish()
        if self.path:
            folder = os.path.dirname(self.path)
            print(f"done: checkpoints in {folder} (last.pt is the newest), metrics in {self.path}; plot them with "
                  f"python tools/plot_metrics.py {folder}", flush=True)


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
