"""Which layers get an adapter.

A layer qualifies structurally: it has `in_features`, `out_features` and `weight`. That admits nn.Linear and
the bitsandbytes Linear4bit/Linear8bitLt (which are not plain Linear weights) without a list of classes.

Filters, in order: exclude regexes, layer indices, include regexes (or all-linear), roles. Roles are only
computed when a role filter is set, so an unusual model never fails on a layer you did not ask for.
"""

from __future__ import annotations

import re

from torch import nn

from .config import AdapterConfig
from .errors import TargetError

_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")
_WRITER_NAMES = ("o_proj", "out_proj", "down_proj", "dense_4h_to_h", "fc2", "c_proj")
_READER_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "up_proj", "gate_proj", "fc1", "c_attn")


def is_linear_like(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("in_features", "out_features", "weight")) and callable(module)


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def d_model(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    return max((m.in_features for m in model.modules() if is_linear_like(m)), default=0)


def role_of(name: str, module: nn.Module, hidden: int) -> str:
    d_in, d_out = module.in_features, module.out_features
    if d_in == hidden and d_out != hidden:
        return "reader"
    if d_out == hidden and d_in != hidden:
        return "writer"
    if d_in == hidden and d_out == hidden:
        leaf = name.rsplit(".", 1)[-1]
        if any(k in leaf for k in _WRITER_NAMES):
            return "writer"
        if any(k in leaf for k in _READER_NAMES):
            return "reader"
        raise TargetError(f"cannot tell whether square layer {name!r} ({d_in}->{d_out}) reads from or writes to "
                          "the residual stream; drop target_roles and select it with target_names instead")
    return "inner"


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module, str | None]]:
    """Return [(qualified name, module, role or None)] for every layer the config selects."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hidden = d_model(model) if cfg.target_roles else 0
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module) or module is head:
            continue
        if any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        if not cfg.all_linear and not any(re.search(p, name) for p in cfg.target_names):
            continue
        role = role_of(name, module, hidden) if cfg.target_roles else None
        if cfg.target_roles and role not in cfg.target_roles:
            continue
        found.append((name, module, role))
    if not found:
        linear = [n for n, m in model.named_modules() if n and is_linear_like(m)]
        raise TargetError(
            f"no target layers matched: target_names={cfg.target_names}, exclude_names={cfg.exclude_names}, "
            f"layers={cfg.layers}, target_roles={cfg.target_roles}. The model's linear layers include "
            f"{linear[:8]}{' ...' if len(linear) > 8 else ''}; adjust the regexes or filters to match some of them")
    return found
