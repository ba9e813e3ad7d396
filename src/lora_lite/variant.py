"""The variant contract, the registry, and ParamSpec.

A method is one class (never instantiated) in one file under `lora_lite/variants/`, decorated with `@register`.
That single registration is where every fact about the method lives; the runtime, merge/export, the benchmark,
the cost report, the test matrix and every error message that lists methods read it from `REGISTRY`.

Each adapter lives on its layer as an `Adapter` module (lora_lite.runtime) holding the `lora_*` tensors, the
config (`a.cfg`) and the layer (`a.base`). Every member below that takes `a` gets that module; `forward` and
`forward_input` get a view of it whose floating `lora_*` tensors are already cast to the activation dtype.

Required
    name: str                                   registry key, e.g. "lora"; also the config's `variant`
    config: type[AdapterConfig]                 its typed config (a dataclass only this method uses)
    param_specs(d_in, d_out, cfg) -> {name: ParamSpec}    every tensor name starts with "lora_"
    forward(a, x, y) -> y_new                   post-hook: the *full* new output, not a delta
      or forward_input(a, x) -> x_new           pre-hook, for input-side methods (IA3-FF, HRA)

Attach time (optional)
    check(d_in, d_out, cfg)                     raise ConfigError for shapes/knobs the method cannot take
    init(a)                                     fill the tensors beyond their ParamSpec init; may read
                                                a.base.weight, never writes it
    group_init(model, adapters, cfg, data)      model-level or data-driven init, run with the hooks live;
                                                adapters is the list of this attach's Adapter modules
    group_setup(model, adapters, cfg, loaded)   runs on attach (tensors made, before init) and on load (the
                                                file's tensors in place, loaded=True): ties one Parameter into
                                                the layers that share it (Lily), or rebuilds frozen state from
                                                the config instead of storing it (VeRA's projections, SHiRA's
                                                mask). adapters: this attach's / load's Adapter modules
    requires_calibration = True                 attach refuses to start without calibration_data
    needs_dense_weight = True                   init or forward reads (DoRA) or rewrites (PiSSA) a dense float
                                                nn.Linear weight; quantized layers are refused up front
    base_delta(a) -> (d_out, d_in)              the part of W the adapter takes over: the runtime writes
                                                W <- W - base_delta while the adapter is active and restores W
                                                bit-exactly when it is not (at most one such adapter per layer)

Merge and export (optional)
    delta_weight(a) -> (d_out, d_in) fp32       W_merged - W_current for additive methods (W_current is the layer
                                                weight as it is, W_res for base_delta methods)
    merged_weight(a, W, bias) -> (W', b') fp32  for non-additive methods (IA3 scales rows and bias, RoAd rotates
                                                both, HRA multiplies W on the input side); bias may be None
    lora_factors(a) -> (A, B, scale)            fp32 A (k, d_in), B (d_out, k) with W_merged - W_original =
                                                scale·B A exactly: exportable as a plain LoRA (export_peft)

Facts the rest of the package reads (optional unless noted)
    paper = (label, url)                        for the README's method table (required)
    layer_kinds = ("linear", "conv", ...)       the layer kinds the method's math is right for (lora_lite.layer_kinds:
                                                linear, conv1d_gpt2, conv, embedding, experts); default
                                                ("linear",). attach refuses another kind, naming the method,
                                                the layer and these kinds; all-linear skips it and says so
    params_per_layer = "r·(d_in + d_out)"       trainable numbers per adapted layer, for the same table (required)
    added_macs(d_in, d_out, cfg) -> int         forward multiply-accumulates per token added to one layer
                                                (matmuls and elementwise products; per-call work such as DoRA's
                                                row norm is not per token). `lora-lite cost` needs it
    call_macs(d_in, d_out, cfg) -> int          MACs one training step (forward and backward) of one layer spends
                                                once, whatever its token count: DoRA's row norm, HRA's r×r solve.
                                                Optional (0); the cost report's ideal ratio counts it
    bench = {"r": .., "alpha": number | "r", "lr": {preset: lr}, "targets": (..), "knobs": {..},
             "preset_knobs": {preset: {..}}}    benchmark defaults (lora_lite.bench.presets.defaults_row);
                                                preset_knobs: the knobs one preset's model needs on top of knobs
    couples_rows(cfg) -> bool                   True when a row's output depends on the batch's other rows
                                                (Lily's batch-mean router); per_row refuses such an adapter
    peft(cfg, target_names) -> (PeftConfig, label) | None
                                                PEFT's equivalent, for the parity tests and the cost report
    peft_prepare(peft_model, cfg)               what PEFT does to its model beyond the config to get the same
                                                method (LoRA-FA: freeze lora_A, as create_lorafa_optimizer does)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError, UnknownVariantError
from .layer_kinds import KIND_NAMES

InitFn = Callable[[torch.Tensor], Any]

_BENCH_KEYS = {"r", "alpha", "lr", "targets", "knobs", "preset_knobs"}


@dataclass(frozen=True)
class ParamSpec:
    """Shape and initial value of one adapter tensor.

    init: "zeros" | "ones" | "kaiming" (nn.Linear's default, kaiming_uniform(a=sqrt 5)) | a callable that
    fills the tensor in place. Buffers (as_buffer=True) are frozen state that is still saved.
    """

    shape: tuple[int, ...]
    init: str | InitFn = "zeros"
    trainable: bool = True
    as_buffer: bool = False

    def make_tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=dtype, device=device)
        with torch.no_grad():
            if callable(self.init):
                self.init(t)
            elif self.init == "zeros":
                t.zero_()
            elif self.init == "ones":
                t.fill_(1.0)
            elif self.init == "kaiming":
                if t.ndim < 2:
                    raise ConfigError(f"kaiming init needs a 2-D tensor, got shape {self.shape}")
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            else:
                raise ConfigError(f"unknown ParamSpec init {self.init!r}; use zeros, ones, kaiming or a callable")
        return t


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a method to REGISTRY under `cls.name` and name its config after it."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{cls.__qualname__} needs `name = '<method>'`, a Python identifier such as 'lora'")
    if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
        raise ConfigError(f"method name {name!r} is taken by {REGISTRY[name].__qualname__}; pick another name")
    config = getattr(cls, "config", None)
    if not (isinstance(config, type) and issubclass(config, AdapterConfig)):
        raise ConfigError(f"method {name!r} needs `config = <its AdapterConfig subclass>`")
    claimed = config.__dict__.get("variant")
    if claimed not in (None, name):
        raise ConfigError(f"{config.__name__} already belongs to method {claimed!r}; give {name!r} its own config class")
    if not callable(getattr(cls, "param_specs", None)):
        raise ConfigError(f"method {name!r} lacks `param_specs(d_in, d_out, cfg)`; see lora_lite.variant")
    if callable(getattr(cls, "forward", None)) == callable(getattr(cls, "forward_input", None)):
        raise ConfigError(f"method {name!r} needs exactly one of `forward(a, x, y)` and `forward_input(a, x)`")
    for fact in ("paper", "params_per_layer"):
        if not getattr(cls, fact, None):
            raise ConfigError(f"method {name!r} lacks `{fact}` (the README's method table is built from it)")
    bench = getattr(cls, "bench", None)
    if bench is not None and (not isinstance(bench, dict) or set(bench) - _BENCH_KEYS or "lr" not in bench):
        raise ConfigError(f"method {name!r}: `bench` must be a dict with 'lr' and only keys {sorted(_BENCH_KEYS)}")
    kinds = getattr(cls, "layer_kinds", DEFAULT_KINDS)
    if not (isinstance(kinds, tuple) and "linear" in kinds and set(kinds) <= set(KIND_NAMES)
            and len(set(kinds)) == len(kinds)):
        raise ConfigError(f"method {name!r}: `layer_kinds` must be a tuple of distinct kinds from {KIND_NAMES} "
                          f"that includes 'linear', got {kinds!r}")
    config.variant = name
    REGISTRY[name] = cls
    return cls


DEFAULT_KINDS = ("linear",)


def layer_kinds(variant: type) -> tuple[str, ...]:
    """The layer kinds a method supports, in lora_lite.layer_kinds order."""
    declared = getattr(variant, "layer_kinds", DEFAULT_KINDS)
    return tuple(k for k in KIND_NAMES if k in declared)


def variant_named(name: str) -> type:
    if name not in REGISTRY:
        raise UnknownVariantError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}. "
                                  "Fix the name, or import the module that registers it")
    return REGISTRY[name]


def config_class(name: str) -> type[AdapterConfig]:
    return variant_named(name).config


def rewrites_weight(variant: type) -> bool:
    return hasattr(variant, "base_delta")


def couples_rows(cfg: AdapterConfig) -> bool:
    """Whether, under this config, an adapter's output for one batch row depends on the other rows."""
    fact = getattr(variant_named(cfg.variant), "couples_rows", None)
    return bool(fact(cfg)) if fact is not None else False


def hook_only_methods() -> list[str]:
    """Methods that never need a dense float weight, so they run on bitsandbytes 4/8-bit layers."""
    return sorted(n for n, v in REGISTRY.items() if not getattr(v, "needs_dense_weight", False))


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; the common same-dtype case skips even the no-op `.to` call (hooks and forwards run once per
    layer per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def autocast_off(device: torch.device):
    """A block where fp32 math stays fp32 inside an autocast region, which would run its matmuls in bf16/fp16
    (base_delta, a method's fp32 statistics). A no-op on devices autocast does not know."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def check_rank(d_in: int, d_out: int, cfg: Any) -> None:
    """Shared check for methods whose r indexes a low-rank factor of a (d_out, d_in) weight."""
    fits = min(d_in, d_out)
    if cfg.r > fits:
        raise ConfigError(f"{cfg.variant}: r={cfg.r} exceeds min(d_in, d_out)={fits} of a {d_in}->{d_out} layer, and "
                          f"the method takes r from that layer's singular vectors: pass r<={fits} for that layer "
                          "(rank_pattern), or exclude that layer with exclude_names / target_names")
