"""Typed adapter configs.

`AdapterConfig` holds what every method shares: the storage dtype of the adapter tensors and the targeting
fields. `RankConfig` adds r, `LowRankConfig` r and alpha (s = alpha / r, or alpha / √r with
use_rslora), for the methods that have them. Each method subclasses one of them in
its own file and adds its own knobs; its registration (lora_lite.variant.register) sets the config's `variant`
name, so a config only carries the fields its method uses. `to_dict`/`from_dict` round-trip a config through
JSON so a checkpoint can rebuild it without pickle. Every field is checked against its annotation on
construction (lists become tuples, bools are not ints, floats must be finite, ints below 2**31), so a config
rebuilt from a downloaded file is held to the same rules as one typed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import ConfigError, UnknownVariantError
from .typecheck import check_field, short_repr

ALL_LINEAR = "all-linear"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(kw_only=True)  # so that a subclass's own fields come first: LoRAConfig(8) means r=8
class AdapterConfig:
    """Fields every method shares.

    dtype        storage dtype of the adapter tensors: a torch dtype or its name ("float32"). None (the default)
                 keeps fp32 master tensors (fp64 on an fp64 layer); forward casts them to the activation
                 dtype, so a bf16 model computes in bf16 while AdamW updates are kept at fp32 precision.
    target_names regexes (re.search on the qualified module name); "all-linear" or () means every
                 linear-like layer except the output head and embeddings.
    exclude_names regexes that remove modules, applied before everything else.
    layers       keep only modules whose name has `.layers.<i>.` with i in this tuple; None keeps all.
    target_roles keep only "reader" (d_model -> other), "writer" (other -> d_model) or "inner" layers;
                 () disables the role filter.
    """

    variant: ClassVar[str] = "?"  # set by lora_lite.register on the method's own config class
    dtype: torch.dtype | str | None = None
    target_names: tuple[str, ...] | str = ALL_LINEAR
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None
    target_roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "variant" not in type(self).__dict__:
            raise ConfigError(f"{type(self).__name__} is not the config of a registered method; use one such as "
                              "LoRAConfig(r=8), or decorate your method class with @lora_lite.register")
        if isinstance(self.target_names, str):
            self.target_names = (self.target_names,)
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(type(self), f.name, getattr(self, f.name)))
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ConfigError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}; pass one of them or None")
            self.dtype = DTYPES[self.dtype]
        if self.dtype is not None and self.dtype not in DTYPES.values():
            raise ConfigError(f"dtype must be None or one of torch.{', torch.'.join(DTYPES)}; got {self.dtype!r}")
        bad_roles = set(self.target_roles) - {"reader", "writer", "inner"}
        if bad_roles:
            raise ConfigError(f"target_roles has {sorted(bad_roles)}; allowed roles are reader, writer and inner")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers={self.layers} has a negative index; use the non-negative block indices")
        for field_name in ("target_names", "exclude_names"):
            for pattern in getattr(self, field_name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"{field_name} entry {pattern!r} is not a valid regular expression ({e}); "
                                      "fix the pattern (escape literal dots and brackets with a backslash)") from None

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
        from .variant import REGISTRY  # the registry imports this module

        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a dict (JSON object) with a 'variant' key, got {short_repr(d)} "
                              f"({type(d).__name__}); pass the output of cfg.to_dict()")
        d = dict(d)
        name = d.pop("variant", None)
        if not isinstance(name, str):
            raise ConfigError(f"config has no 'variant' string (found {short_repr(name)}); add e.g. \"variant\": \"lora\"")
        if name not in REGISTRY:
            raise UnknownVariantError(f"config names method {short_repr(name)}, which is not registered; known methods: "
                                      f"{', '.join(sorted(REGISTRY))}. Import the module that registers it, or fix the name")
        cls = REGISTRY[name].config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k)[:60] for k in set(d) - known)
        if unknown:
            raise ConfigError(f"config for {name!r} has unknown fields {unknown[:10]}; known fields: {sorted(known)}. "
                              "The file was written by a different lora-lite version or was edited")
        if d.get("dtype") is not None and not (isinstance(d["dtype"], str) and d["dtype"] in DTYPES):
            raise ConfigError(f"dtype {short_repr(d['dtype'])} is not one of {sorted(DTYPES)} or null")
        return cls(**d)


@dataclass
class RankConfig(AdapterConfig):
    """r            rank of the update (or the method's size knob; see its docstring)."""

    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ConfigError(f"r must be a positive int, got {self.r}; use r >= 1")


@dataclass
class LowRankConfig(RankConfig):
    """alpha        scale numerator: additive methods use s = alpha / r.
    use_rslora   rank-stabilized scaling, s = alpha / √r (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor
                 for Fine-Tuning with LoRA", arXiv 2312.03732): with alpha / r the update shrinks as r grows, so high
                 ranks learn slowly; alpha / √r keeps its size independent of r. PEFT's `use_rslora`. Every method
                 that uses `scale` honours it; one whose strength is not alpha-based refuses it in its `check`.
    """

    alpha: float = 16.0
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def config_class(variant: str) -> type[AdapterConfig]:
    from .variant import config_class as lookup

    return lookup(variant)
