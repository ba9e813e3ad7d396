"""Everything about a model that attach/load may change, captured so a test can assert it came back unchanged.

Independent of lora_lite.transaction on purpose: the tests check the rollback, they do not reuse it.
"""

from __future__ import annotations

import torch
from torch import nn


def _hook_counts(module: nn.Module) -> dict[str, int]:
    return {name: len(value) for name, value in vars(module).items() if "hook" in name and isinstance(value, dict)}


def fingerprint(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {n: (p.requires_grad, p.dtype, p.data_ptr()) for n, p in model.named_parameters()},
        "buffers": sorted(n for n, _ in model.named_buffers()),
        "modules": {n: (type(m), sorted(vars(m)), _hook_counts(m), m.training) for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Weights bit-identical, same params/buffers/attributes/flags, no hooks added, no lora state left."""
    after = fingerprint(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.dtype == v.dtype and torch.equal(w, v), f"{k} changed"
    assert after["params"] == before["params"]
    assert after["buffers"] == before["buffers"]
    assert after["modules"].keys() == before["modules"].keys()
    for name, (kind, attrs, hooks, training) in before["modules"].items():
        a_kind, a_attrs, a_hooks, a_training = after["modules"][name]
        assert a_kind is kind
        assert a_attrs == attrs, f"{name!r} attributes changed: {set(a_attrs) ^ set(attrs)}"
        assert a_hooks == hooks, f"{name!r} hooks changed: {a_hooks} vs {hooks}"
        assert a_training == training
    assert not hasattr(model, "_lora_lite")
    for name, module in model.named_modules():
        stray = [a for a in vars(module) if a.startswith(("_lora", "lora_"))]
        stray += [n for n in (*module._parameters, *module._buffers) if n.startswith("lora_")]
        assert not stray, f"{name!r} keeps {stray}"
