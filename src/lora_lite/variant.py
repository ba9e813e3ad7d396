"""The variant contract, the registry, and ParamSpec.

A variant is a class (never instantiated) with static methods; the runtime finds the optional ones by
`hasattr`, the way torchtune finds adapters by protocol:

    name: str                                   registry key, e.g. "lora"
    config: type[AdapterConfig]                 its typed config
    param_specs(d_in, d_out, cfg) -> {name: ParamSpec}    every tensor name starts with "lora_"
    init(layer, cfg)                            fill the tensors; may read layer.weight, never writes it
    forward(layer, x, y) -> y_new               post-hook: the *full* new output, not a delta
  optional
    forward_input(layer, x) -> x_new            pre-hook instead of `forward` (input-side variants)
    group_init(model, targets, cfg, data)       model-level or data-driven init, run with hooks active
    base_delta(layer) -> (d_out, d_in) tensor   the part of W the adapter takes over; the runtime writes
                                                W <- W - base_delta and restores W bit-exactly on detach
    delta_weight(layer) -> (d_out, d_in)        fp32 W_merged - W_current for additive variants (merge). W_current
                                                is layer.weight as it is now (W_res for base_delta variants)
    merged_weight(layer, W, bias) -> (W', b')   merge for non-additive variants: fp32 merged weight and bias from
                                                the current dense W and bias (fp32; bias may be None). IA3 scales
                                                rows and bias, RoAd rotates both, HRA multiplies W on the input side
    lora_factors(layer) -> (A, B, scale)        fp32 A (k, d_in), B (d_out, k), float scale with
                                                W_merged - W_original = scale · B A exactly, W_original being the
                                                weight before attach. Makes the variant exportable as a plain LoRA
                                                (export_peft); scale must be the same on every layer
    needs_dense_weight: bool                    True if forward reads (DoRA) or attach rewrites (PiSSA) a dense
                                                float weight; others read W only through quant.dense_weight
    requires_calibration: bool                  True if group_init cannot run without data
    check(d_in, d_out, cfg)                     raise ConfigError for shapes the variant cannot take
    added_macs(d_in, d_out, cfg) -> int         forward multiply-accumulates per token the adapter adds to one
                                                layer (matmuls plus elementwise multiplies; token-independent
                                                work such as DoRA's row norm is not per token and not counted).
                                                Used by `lora-lite cost`, which errors for a variant without it
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .errors import ConfigError

InitFn = Callable[[torch.Tensor], Any]


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


class Variant(Protocol):
    name: str

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: Any) -> dict[str, ParamSpec]: ...

    @staticmethod
    def init(layer: nn.Module, cfg: Any) -> None: ...

    @staticmethod
    def forward(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a variant to REGISTRY under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__qualname__} has no `name`; set name = '<variant>' on the class")
    if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
        raise ConfigError(f"variant name {name!r} is taken by {REGISTRY[name].__qualname__}; pick another name")
    for attr in ("param_specs", "init"):
        if not callable(getattr(cls, attr, None)):
            raise ConfigError(f"variant {name!r} lacks `{attr}`; see lora_lite.variant for the contract")
    if not (callable(getattr(cls, "forward", None)) or callable(getattr(cls, "forward_input", None))):
        raise ConfigError(f"variant {name!r} needs `forward(layer, x, y)` or `forward_input(layer, x)`")
    REGISTRY[name] = cls
    return cls


def check_rank(d_in: int, d_out: int, cfg: Any) -> None:
    """Shared check for variants whose r indexes a low-rank factor of a (d_out, d_in) weight."""
    fits = min(d_in, d_out)
    if cfg.r > fits:
        raise ConfigError(f"{cfg.variant}: r={cfg.r} exceeds min(d_in, d_out)={fits} of a {d_in}->{d_out} layer; "
                          f"pass r<={fits}, or exclude that layer with exclude_names / target_names")
