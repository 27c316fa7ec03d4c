"""Config parsing: dataclass defaults < --config file.yaml < --key value on the command line."""
import contextlib
import dataclasses
import difflib
import inspect
import re
import sys
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


# string options that also take a bare --flag, meaning "true" (--resume: auto | true | false)
FLAG_OPTIONS = ("resume",)


def _field_comments(cls):
    """The trailing `# comment` of each field in the dataclass source, for --help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, flags=re.M))


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
    for f in dataclasses.fields(cls):
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
