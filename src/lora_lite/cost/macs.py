"""Analytic cost per token: the frozen linears' MACs and what an adapter adds to them.

A MAC is one multiply-accumulate, counted per token in the forward pass: a (.., k) @ (k, n) matmul is k·n
MACs per row, an elementwise multiply is one MAC per element. Each variant states its own count through
`added_macs(d_in, d_out, cfg)` (see lora_lite.variant), so a new variant brings its formula with it.
Backward roughly doubles the adapter's share (input and weight gradients); the measured step time is the
honest total.
"""

from __future__ import annotations

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..layer_kinds import KINDS, kind_of
from ..runtime import variant_of
from ..target import find_targets


def layer_added_macs(variant: type, d_in: int, d_out: int, cfg: AdapterConfig) -> int:
    hook = getattr(variant, "added_macs", None)
    if not callable(hook):
        raise ConfigError(f"variant {cfg.variant!r} has no `added_macs(d_in, d_out, cfg)`; add that static method "
                          "(forward MACs per token for one layer, see lora_lite.variant) so the cost report can "
                          "count it")
    return int(hook(d_in, d_out, cfg))


def added_macs(model: nn.Module, cfg: AdapterConfig) -> int:
    """Forward MACs per token that `cfg` adds over every layer it targets in `model`."""
    variant = variant_of(cfg)
    # d_in, d_out as the method sees the layer (lora_lite.layer_kinds); an expert parameter counts one expert
    return sum(layer_added_macs(variant, *KINDS[kind_of(m)].dims(m), cfg) for _, m, _ in find_targets(model, cfg))


def linear_macs(model: nn.Module) -> int:
    """Forward MACs per token of every nn.Linear in `model` (lm_head included): the dense part of the floor."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
