"""Config parsing: dataclass defaults < --config file.yaml < --key value on the command line."""
import contextlib
import dataclasses
import difflib
import inspect
import re
import sys
import types
import typing

import yaml


class UsageError(ValueError):
    """A mistake in what the user asked for (config, data path, checkpoint): reported in one line, no traceback."""


class ConfigError(UsageError):
    pass


@contextlib.contextmanager
def usage_errors():
    """Wrap a script's entry point: a UsageError exits with its message instead of a traceback.

    A UsageError raised in a DataLoader worker (an unreadable image) reaches here re-raised by torch with the
    worker's traceback as its message ("Caught UsageError in DataLoader worker process 0. Original Traceback
    ...", ending in the line "common.config.UsageError: <message>"): only that one-line message is printed."""
    try:
        yield
    except UsageError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        raise SystemExit(f"error: {message}") from None


@dataclasses.dataclass
class PretrainConfig:
    """The settings every pre-training script shares, declared once: where the images come from and how the run
    is carried out (precision, run folder, checkpoints, stops, logging, the kNN monitor). A script's
    `Config(PretrainConfig)` adds its method's and its recipe's fields and sets its out_dir; --help lists them
    first, then these."""
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "data"  # dataset root (folder: an ImageFolder tree with train/ and val/)
    download: bool = False  # let torchvision download cifar10 / cifar100 / stl10 into data_dir
    subset: int = 0  # pre-train on a fixed random subset of this many images (0 = all)
    num_workers: int = 4  # data-loading processes per rank
    views: str = "auto"  # batched (a batch at a time on the device) | workers (per image) | auto: batched unless folder
    bad_images: str = "stop"  # an unreadable image file: stop (naming it) | skip (warn, use the next image)
    small_image_blur: bool = False  # blur views below 96 px too, with the preset's p (a 13-tap kernel at 32 px)
    jitter: tuple[float, ...] | None = None  # brightness, contrast, saturation, hue of every view (null: the preset's)
    # computation
    precision: str = "auto"  # auto (bf16 where native, else fp16 on GPU, fp32 on CPU) | bf16 | fp16 (GPU) | fp32
    channels_last: bool = True  # NHWC memory format (faster convolutions with mixed precision)
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model init, data order and augmentations
    # run folder, checkpoints, stops
    out_dir: str = "runs/run"  # run folder: config.json, metrics.jsonl, checkpoints (last.pt is the newest)
    resume: str = "auto"  # auto: continue the run in out_dir if it holds one with these settings | true | false
    checkpoint_every_steps: int = 0  # also checkpoint every this many steps (0 = off; always at epoch ends)
    checkpoint_every_minutes: float = 30.0  # also checkpoint every this many minutes (0 = off)
    keep_checkpoints: int = 2  # step_XXXXXXXX.pt files kept (older ones are deleted; epoch snapshots stay)
    snapshot_every: int = 100  # also keep epoch_XXXX.pt every this many epochs (and at the end)
    stop_timeout: float = 120.0  # after SIGTERM / SIGUSR1: seconds to finish the step and checkpoint, else exit
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before the job stops
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient to skip (0: stop at the first)
    # logging, the kNN monitor and the online linear probe
    log_every: int = 10  # steps between lines of metrics.jsonl
    logger: str = "none"  # also send every logged value to: none | tensorboard (out_dir/tensorboard) | wandb
    knn_every: int = 0  # epochs between online kNN checks on the labelled train/val splits (0 = off)
    knn_k: int = 200  # neighbours of the kNN monitor
    knn_temperature: float = 0.07  # vote temperature of the kNN monitor
    probe_every: int = 0  # epochs between val checks of the online linear probe, trained every step (0 = no probe)
    probe_lr: float = 0.1  # the probe's peak lr (SGD, momentum 0.9, no weight decay) on the trunk's warm-up and cosine


# string options that also take a bare --flag, meaning "true" (--resume: auto | true | false)
FLAG_OPTIONS = ("resume",)


def _field_comments(cls):
    """The trailing `# comment` of each field in the dataclass sources (a subclass's over its base's), for --help."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(re.findall(r"^    (\w+)\s*:[^#\n]*#\s*(.*)$", source, flags=re.M))
    return comments


def _coerce(name, value, typ):
    """Check `value` (parsed by YAML) against the field's type; ints are accepted for floats."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, bool):  # YAML's `resume: true` for an auto | true | false option
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    elif typing.get_origin(typ) is types.UnionType:  # X | None
        return None if value is None else _coerce(name, value, typing.get_args(typ)[0])
    elif typing.get_origin(typ) is tuple:
        if isinstance(value, (list, tuple)):
            item = typing.get_args(typ)[0]
            return tuple(_coerce(name, v, item) for v in value)
    else:
        raise ConfigError(f"config field {name!r} has unsupported type {typ}")
    pretty = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key {name!r} expects {pretty}, got {value!r}")


def _unknown(name, fields, where):
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {name!r} {where}{hint}. Valid keys: {', '.join(fields)}")


def load_config(cls, argv):
    """Build `cls` from argv: `--config file.yaml` first, then `--key value` / `--key=value` / `--flag`, or
    `key=value` as hydra-style repositories take it (`python simclr.py epochs=200`)."""
    types = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        bare_key, bare_eq, bare_value = arg.partition("=")
        if bare_eq and bare_key and not arg.startswith("-"):  # key=value
            pairs.append((bare_key.replace("-", "_"), bare_value))
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value or key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_flag = types.get(key) is bool or key in FLAG_OPTIONS
            if is_flag and (nxt is None or nxt.startswith("--") or "=" in nxt):
                value = "true"  # a bare --flag switches a boolean on (a boolean's value never holds "=")
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1

    values = {}
    for key, value in pairs:
        if key != "config":
            continue
        try:
            with open(value) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {value}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {value} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {value} must hold a mapping of key: value")
        for k, v in loaded.items():
            if k not in types:
                raise _unknown(k, fields, f"in {value}")
            values[k] = _coerce(k, v, types[k])
    for key, value in pairs:
        if key == "config":
            continue
        if key not in types:
            raise _unknown(key, fields, "on the command line")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if types[key] is str:
            parsed = value  # strings are taken verbatim: --data_dir 001 stays '001'
        values[key] = _coerce(key, parsed, types[key])
    return cls(**values)


def usage(cls, prog):
    comments = _field_comments(cls)
    lines = [f"usage: {prog} [--config file.yaml] [--key value | key=value ...]", "", "keys (default, meaning):"]
    own = list(vars(cls).get("__annotations__", {}))  # the script's own fields first, then those it shares
    for f in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        lines.append(f"  --{f.name:<18} {f.default!r:<14} {comments.get(f.name, '')}")
    return "\n".join(lines)


def parse_config(cls, argv=None):
    """The command-line entry point: prints --help, and turns a bad key or value into a clear exit."""
    argv = sys.argv[1:] if argv is None else argv
    prog = sys.argv[0]
    if "-h" in argv or "--help" in argv:
        print(usage(cls, prog))
        raise SystemExit(0)
    try:
        return load_config(cls, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}\n(run {prog} --help for every key and its default)") from None
