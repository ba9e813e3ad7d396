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
from .patterns import check_pattern
from .typecheck import check_field, short_repr

ALL_LINEAR = "all-linear"
# fields added after file format v2 was introduced (layer kinds, patterns, extras, rsLoRA), written only when set
LATER_FIELDS = ("target_parameters", "modules_to_save", "trainable_token_indices", "rank_pattern", "alpha_pattern",
                "use_rslora")
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
    target_parameters regexes (re.search on the qualified parameter name) naming 3-D expert parameters of MoE
                 layers (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), as PEFT's target_parameters does;
                 all-linear already includes them for methods that support the "experts" layer kind.
    modules_to_save regexes naming modules (classifier heads, `score`, `lm_head`) whose parameters train whole,
                 in place, and are saved with the adapter; detach puts the original values back.
    trainable_token_indices token ids whose rows of the input embedding train (and of the output head, when it
                 is tied to the embedding); only those rows are saved.
    """

    variant: ClassVar[str] = "?"  # set by lora_lite.register on the method's own config class
    dtype: torch.dtype | str | None = None
    target_names: tuple[str, ...] | str = ALL_LINEAR
    exclude_names: tuple[str, ...] = ("lm_head", "embed_tokens")
    layers: tuple[int, ...] | None = None
    target_roles: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    trainable_token_indices: tuple[int, ...] = ()

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
        for field_name in ("target_names", "exclude_names", "target_parameters", "modules_to_save"):
            for pattern in getattr(self, field_name):
                check_pattern(field_name, pattern)
        ids = self.trainable_token_indices
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError(f"trainable_token_indices={short_repr(ids)} must be distinct non-negative token ids")

    @property
    def all_linear(self) -> bool:
        return self.target_names in ((), (ALL_LINEAR,))

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the later ones (LATER_FIELDS) while unset: a plain adapter's file stays readable
        by lora-lite versions from before them. from_dict fills what is absent with the defaults."""
        d = dataclasses.asdict(self)
        d["variant"] = self.variant
        d["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return {k: v for k, v in d.items() if not (k in LATER_FIELDS and (v in ((), {}) or v is False))}

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
    """r            rank of the update (or the method's size knob; see its docstring).
    rank_pattern {regex: r} per layer: the first regex that re.search-es a layer's qualified name gives its r
                 (PEFT's rank_pattern). The resolved values are saved in the adapter file."""

    r: int = 8
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern, r in {"": self.r, **self.rank_pattern}.items():
            if r < 1:
                raise ConfigError(f"r must be a positive int, got {r}{f' for {pattern!r}' if pattern else ''}; use r >= 1")
            check_pattern("rank_pattern", pattern)


@dataclass
class LowRankConfig(RankConfig):
    """alpha        scale numerator: additive methods use s = alpha / r.
    alpha_pattern {regex: alpha} per layer, like rank_pattern (PEFT's alpha_pattern).
    use_rslora   rank-stabilized scaling, s = alpha / √r (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor
                 for Fine-Tuning with LoRA", arXiv 2312.03732): with alpha / r the update shrinks as r grows, so high
                 ranks learn slowly; alpha / √r keeps its size independent of r. PEFT's `use_rslora`. Every method
                 that uses `scale` honours it (per layer, with that layer's r and alpha); one whose strength is not
                 alpha-based refuses it in its `check`.
    """

    alpha: float = 16.0
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict, kw_only=True)
    use_rslora: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for pattern in self.alpha_pattern:
            check_pattern("alpha_pattern", pattern)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# The per-layer fields patterns set, and the pattern field that sets each.
LAYER_FIELDS = {"r": "rank_pattern", "alpha": "alpha_pattern"}


def pattern_values(cfg: AdapterConfig, lname: str) -> dict[str, int | float]:
    """{"r": .., "alpha": ..} that cfg's rank_pattern / alpha_pattern give layer `lname`, where they differ from
    cfg's own r and alpha (first matching regex wins). Runs the regexes: attach time only, never at load."""
    out = {}
    for key, field_name in LAYER_FIELDS.items():
        for pattern, value in getattr(cfg, field_name, {}).items():
            if re.search(pattern, lname):
                if value != getattr(cfg, key):
                    out[key] = value
                break
    return out


def for_layer(cfg: AdapterConfig, values: dict[str, int | float]) -> AdapterConfig:
    """The config a method sees on one layer: cfg with that layer's r / alpha (`values`, see pattern_values)."""
    return dataclasses.replace(cfg, **values) if values else cfg


def config_class(variant: str) -> type[AdapterConfig]:
    from .variant import config_class as lookup

    return lookup(variant)
