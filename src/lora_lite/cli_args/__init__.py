"""Argument checks shared by `lora-lite bench` and `lora-lite cost`: every bad value is one line, before any work.

    CliParser            argparse with a one-line error (`prog: error: ...`, exit 2) instead of usage + traceback
    positive_int, ...    argparse `type=` checkers: the message names the flag's rule and the value found
    parse_knob           KEY=VALUE text -> a config field's value, typed by the field's annotation, so that
                         `bench --set niter=4` and `cost --variants pissa:niter=4` follow one rule
    check_output_dir     an output folder that can be created and written, checked without creating anything

Command-line code, like the bench/ and cost/ subpackages, not core: its argparse `type=` checkers signal a bad
value with argparse.ArgumentTypeError, argparse's own protocol, which CliParser turns into the one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
_INT = re.compile(r"[-+]?\d+")
_TRUE, _FALSE = ("true",), ("false",)  # one spelling: "yes"/"1" are not silently read as booleans


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        first = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {first} (see {self.prog} --help)\n")


def usage_error(prog: str, err: Exception) -> int:
    """Print a resolve-time error as the parser would, and return argparse's exit status."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def _number(raw: str, kind):
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a finite number")
    return value


def _checked(kind, rule: str, ok):
    def check(raw: str):
        value = _number(raw, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{raw!r}: must be {rule}")
        return value
    check.__name__ = rule  # argparse names the type in some messages
    return check


positive_int = _checked(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a finite number > 0", lambda v: v > 0)
nonnegative_float = _checked(float, "a finite number >= 0", lambda v: v >= 0)


def threads(raw: str) -> int | str:
    """'auto' or a positive thread count."""
    return "auto" if raw == "auto" else positive_int(raw)


def auto_threads() -> tuple[int, str]:
    """Torch CPU threads for a machine others may be using: the cores the 1-minute load average does not fill
    (a fully busy core is one less thread; at least 1)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = max(1, min(cores, cores - math.floor(load)))
    return n, f"auto: {cores} cores, load average {load:.1f}"


# ---- config knobs ---------------------------------------------------------------------------------------------
def config_fields(cls) -> dict[str, Any]:
    """Field name -> annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a comma-separated list of {describe_type(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "none"
    if hint is torch.dtype:
        return "a dtype (" + ", ".join(DTYPE_NAMES) + ")"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))


def _from_text(raw: str, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in sorted(args, key=lambda h: h is not type(None)):  # "none" means None before it means "none"
            ok, value = _from_text(raw, option)
            if ok:
                return True, value
        return False, None
    if hint is type(None):
        return raw.lower() in ("none", "null"), None
    if hint is bool:
        low = raw.lower()
        return (low in _TRUE + _FALSE), low in _TRUE
    if hint is int:
        return (bool(_INT.fullmatch(raw)), int(raw) if _INT.fullmatch(raw) else None)
    if hint is float:
        try:
            value = float(raw)
        except ValueError:
            return False, None
        return math.isfinite(value), value
    if hint is str:
        return True, raw
    if hint is torch.dtype:
        return raw in DTYPE_NAMES, DTYPE_NAMES.get(raw)
    if origin is Literal:
        for option in args:
            if str(option) == raw:
                return True, option
        return False, None
    if origin is tuple:
        items = [s.strip() for s in raw.split(",")] if raw.strip() else []
        converted = [_from_text(item, args[0]) for item in items]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    return False, None


def parse_knob(cls, key: str, raw: str, source: str) -> Any:
    """The value of config field `key` of `cls` written as text; `source` (e.g. "--set niter=4.0") is quoted
    in the error."""
    fields = config_fields(cls)
    if key not in fields:
        raise ConfigError(f"{source}: {cls.__name__} has no field {key!r}; its fields are "
                          f"{', '.join(sorted(fields))}")
    ok, value = _from_text(raw, fields[key])
    if not ok:
        raise ConfigError(f"{source}: {cls.__name__}.{key} must be {describe_type(fields[key])}, got {raw!r}")
    return value


def split_knob(item: str, source: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
    return key.strip(), raw.strip()


# ---- paths ------------------------------------------------------------------------------------------------------
def check_output_dir(path: Path, flag: str) -> Path:
    """`path` is a folder we can write into, or one we can create; nothing is created here."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a folder; pick another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {probe} is not writable; pick a folder you can write to")
    return path


def check_output_file(path: Path, flag: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    check_output_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is not writable")
    return path
