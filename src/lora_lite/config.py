"""Typed adapter configs.

`AdapterConfig` holds the fields every variant shares; each variant subclasses it in its own file, sets its
`variant` default and adds its own knobs. `to_dict`/`from_dict` round-trip a config through JSON so a
checkpoint can rebuild it without pickle. Every field is checked against its annotation on construction
(lists become tuples, bools are not ints, floats must be finite, ints below 2**31), so a config rebuilt
from a downloaded file is held to the same rules as one typed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import ConfigError, UnknownVariantError
from .typecheck import check_field, short_repr

ALL_LINEAR = "all-linear"
_CONFIGS: dict[str, type[AdapterConfig]] = {}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class AdapterConfig:
    """Fields shared by every variant.

    r            rank (or the variant's size knob; see the variant docstring).
    alpha        scale numerator; additive variants use s = alpha / r.
    dtype        dtype of the adapter tensors; None means "the target layer's float weight dtype"
                 (float32 for quantized layers).
    target_names regexes (re.search on the qualified module name); "all-linear" or () means every
                 linear-like layer except the output head and embeddings.
    exclude_names regexes that remove modules, applied before everything else.
    layers       keep only modules whose name has `.layers.<i>.` with i in this tuple; None keeps all.
    target_roles keep only "reader" (d_model -> other), "writer" (other -> d_model) or "inner" layers;
                 () disables the role filter.
    """

    variant: ClassVar[str] = "?"
    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype | None = None
    target_names: tuple[str, ...] | str = ALL_LINEAR
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None
    target_roles: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("variant")
        if name is None or name == "?":
            return
        if name in _CONFIGS and _CONFIGS[name].__qualname__ != cls.__qualname__:
            raise ConfigError(f"two config classes claim variant {name!r}: {_CONFIGS[name].__qualname__} and "
                              f"{cls.__qualname__}; give the new one a distinct `variant` name")
        _CONFIGS[name] = cls

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            raise ConfigError("AdapterConfig is abstract; use a variant config such as LoRAConfig(r=8)")
        if isinstance(self.target_names, str):
            self.target_names = (self.target_names,)
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(type(self), f.name, getattr(self, f.name)))
        bad_roles = set(self.target_roles) - {"reader", "writer", "inner"}
        if bad_roles:
            raise ConfigError(f"target_roles has {sorted(bad_roles)}; allowed roles are reader, writer and inner")
        if self.r < 1:
            raise ConfigError(f"r must be a positive int, got {self.r}; use r >= 1")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers={self.layers} has a negative index; use the non-negative block indices")
        if self.dtype is not None and self.dtype not in _DTYPES.values():
            raise ConfigError(f"dtype must be None or one of torch.{', torch.'.join(_DTYPES)}; got {self.dtype!r}")
        for field_name in ("target_names", "exclude_names"):
            for pattern in getattr(self, field_name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"{field_name} entry {pattern!r} is not a valid regular expression ({e}); "
                                      "fix the pattern (escape literal dots and brackets with a backslash)") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def all_linear(self) -> bool:
        return self.target_names in ((), (ALL_LINEAR,))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variant"] = self.variant
        d["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config from `to_dict` output (e.g. parsed JSON): every field is type- and range-checked."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a dict (JSON object) with a 'variant' key, got {short_repr(d)} "
                              f"({type(d).__name__}); pass the output of cfg.to_dict()")
        d = dict(d)
        name = d.pop("variant", None)
        if not isinstance(name, str):
            raise ConfigError(f"config has no 'variant' string (found {short_repr(name)}); add e.g. \"variant\": \"lora\"")
        if name not in _CONFIGS:
            raise UnknownVariantError(f"config names variant {name!r}, which is not registered; known variants: "
                                      f"{sorted(_CONFIGS)}. Import the module that registers it, or fix the name")
        cls = _CONFIGS[name]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k)[:60] for k in set(d) - known)
        if unknown:
            raise ConfigError(f"config for {name!r} has unknown fields {unknown[:10]}; known fields: {sorted(known)}. "
                              "The file was written by a different lora-lite version or was edited")
        if d.get("dtype") is not None:
            if not isinstance(d["dtype"], str) or d["dtype"] not in _DTYPES:
                raise ConfigError(f"dtype {short_repr(d['dtype'])} is not one of {sorted(_DTYPES)} or null")
            d["dtype"] = _DTYPES[d["dtype"]]
        return cls(**d)


def config_class(variant: str) -> type[AdapterConfig]:
    if variant not in _CONFIGS:
        raise UnknownVariantError(f"unknown variant {variant!r}; known variants: {sorted(_CONFIGS)}")
    return _CONFIGS[variant]


def registered_configs() -> dict[str, type[AdapterConfig]]:
    return dict(_CONFIGS)


