"""Check a config field's value against its annotation, the way a JSON file cannot be trusted to.

    check_field(cls, name, value) -> value, converted: lists and ranges become tuples where a tuple is
    declared, ints become floats where a float is declared. Bools are not ints, floats must be finite, ints
    must be below 2**31 in magnitude (every int field is a size or a count). Anything else is a ConfigError
    that names the field, the expected type and the value found.

Understands int, float, str, bool, None, Any, tuple[X, ...], tuple[X, Y], list[X], dict[K, V], Literal[...],
unions (X | Y, Optional) and plain classes (torch.dtype). A variant config using another annotation fails loudly.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from typing import Any

from .errors import ConfigError

_MAX_INT = 2**31  # every int field (r, group_size, niter, ...) is a size or a count; beyond this it is garbage


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:
        raise ConfigError(f"cannot resolve the field annotations of {cls.__qualname__} ({e}); define the types "
                          "its fields use at module level") from None


def short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_field(cls: type, name: str, value: Any) -> Any:
    """`value` checked against the annotation of field `name` of `cls` (converted as above), or a ConfigError."""
    hint = _field_types(cls)[name]
    ok, converted = _conform(value, hint)
    if not ok:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        limits = " (ints must be below 2**31 in magnitude, floats finite)" if numeric else ""
        raise ConfigError(f"{cls.__name__}.{name} must be {_describe(hint)}{limits}, got {short_repr(value)} "
                          f"({type(value).__name__}); fix the value (in the file's 'config' metadata if it "
                          "came from load)")
    return converted


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = _conform(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < _MAX_INT, value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        try:
            value = float(value)
        except OverflowError:
            return False, value
        return math.isfinite(value), value
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args), value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list, range)):
            return False, value
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return False, value
            item_hints = args
        else:
            item_hints = [args[0] if args else Any] * len(value)
        items = [_conform(v, h) for v, h in zip(value, item_hints, strict=True)]
        if not all(ok for ok, _ in items):
            return False, value
        return True, origin(v for _, v in items)
    if origin is dict:
        key_hint, value_hint = args or (Any, Any)
        if not isinstance(value, dict):
            return False, value
        pairs = [(_conform(k, key_hint), _conform(v, value_hint)) for k, v in value.items()]
        if not all(k[0] and v[0] for k, v in pairs):
            return False, value
        return True, {k[1]: v[1] for k, v in pairs}
    if isinstance(hint, type):
        return isinstance(value, hint), value
    raise ConfigError(f"config field annotation {hint!r} is not one lora-lite can check; annotate variant config "
                      "fields with int, float, str, bool, tuple[...], list[...], dict[...], Literal[...] or X | None")
