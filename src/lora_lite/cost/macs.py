"""Analytic cost per token: the frozen linears' MACs and what an adapter adds to them.

A MAC is one multiply-accumulate, counted per token in the forward pass: a (.., k) @ (k, n) matmul is k·n
MACs per row, an elementwise multiply is one MAC per element. Each variant states its own count through
`added_macs(d_in, d_out, cfg)` (see lora_lite.variant), so a new variant brings its formula with it.

The ideal step ratio is what the step would cost if every MAC ran at the same speed and nothing else took time:

    ideal = 1 + (3·ΔF + C / N) / (2·L + 3·T)        per token, summed over layers

ΔF is the adapter's forward MACs per token (`added_macs`), tripled because each one has a forward, an
input-gradient and a weight-gradient MAC in the step. L is the frozen linears' MACs (lm_head included), doubled
because the floor's backward computes input gradients only. T is attention's QKᵀ and PV per token, causal (a
token attends to (seq + 1) / 2 positions on average), tripled for its backward. C is the method's per-call MACs
for one step (`call_macs`: DoRA's row norm, HRA's r×r solve), shared by the step's N tokens.
"""

from __future__ import annotations

from torch import nn

from ..config import AdapterConfig, for_layer, pattern_values
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


def layer_call_macs(variant: type, d_in: int, d_out: int, cfg: AdapterConfig) -> int:
    """MACs one training step of one layer spends once, whatever its token count (0 if the method states none)."""
    hook = getattr(variant, "call_macs", None)
    return int(hook(d_in, d_out, cfg)) if callable(hook) else 0


def target_layers(model: nn.Module, cfg: AdapterConfig) -> list[tuple[nn.Module, int, int, AdapterConfig]]:
    """(layer, d_in, d_out, the layer's config) for every layer `cfg` targets: d_in, d_out as the method sees the
    layer (lora_lite.layer_kinds; an expert parameter's are one expert's), r and alpha from rank_pattern /
    alpha_pattern as attach gives them."""
    return [(m, *KINDS[kind_of(m)].dims(m), for_layer(cfg, pattern_values(cfg, name)))
            for name, m, _ in find_targets(model, cfg)]


def added_macs(model: nn.Module, cfg: AdapterConfig) -> int:
    """Forward MACs per token that `cfg` adds over every layer it targets in `model` (an expert parameter counts
    one expert's)."""
    variant = variant_of(cfg)
    return sum(layer_added_macs(variant, d_in, d_out, c) for _, d_in, d_out, c in target_layers(model, cfg))


def linear_macs(model: nn.Module) -> int:
    """Forward MACs per token of every nn.Linear in `model` (lm_head included): the dense part of the floor."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def call_macs(model: nn.Module, cfg: AdapterConfig) -> int:
    """Per-call MACs of one training step that `cfg` adds over every layer it targets in `model` (every expert of
    an expert parameter: each has its own adapter tensors)."""
    variant = variant_of(cfg)
    return sum(getattr(m, "num_experts", 1) * layer_call_macs(variant, d_in, d_out, c)
               for m, d_in, d_out, c in target_layers(model, cfg))


def attention_macs(model: nn.Module, seq: int) -> float:
    """Forward MACs per token of QKᵀ and PV over every layer of a causal decoder (transformers config fields)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_attention_heads * head_dim * (seq + 1) / 2


def ideal_step_ratio(model: nn.Module, cfg: AdapterConfig, batch: int, seq: int) -> float:
    """The step ÷ floor ratio the MAC counts alone predict for `cfg` on `model` (formula in the module doc)."""
    floor = 2 * linear_macs(model) + 3 * attention_macs(model, seq)
    return 1 + (3 * added_macs(model, cfg) + call_macs(model, cfg) / (batch * seq)) / floor
