"""Which layers get an adapter: include/exclude regexes, the layer filter, roles, the all-linear shortcut, and
structural matching of layers that are not nn.Linear."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from lora_lite.runtime import adapter_layers
from lora_lite.variant import hook_only_methods
from toy_models import ToyModel
from variant_cases import CASES, needs_calibration

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def names(model, **kw):
    return sorted(n for n, _, _ in ll.find_targets(model, ll.LoRAConfig(**kw)))


def leafs(found):
    return sorted({n.rsplit(".", 1)[-1] for n in found})


@pytest.mark.parametrize("kind", ["qwen", "stories"])
def test_all_linear_takes_every_projection_but_not_head_or_embeddings(kind):
    model = fresh_model(kind)
    found = names(model)
    n_layers = model.config.num_hidden_layers
    assert len(found) == 7 * n_layers and leafs(found) == sorted(PROJ)
    # the head is left out by identity, not only by the default exclude regex (stories ties it to the embedding)
    assert names(model, exclude_names=()) == found


def test_include_regex():
    assert leafs(names(fresh_model("qwen"), target_names=(r"(q|v)_proj$",))) == ["q_proj", "v_proj"]


def test_exclude_regex_applies_on_top_of_all_linear():
    found = names(fresh_model("qwen"), exclude_names=(r"\.mlp\.",))
    assert leafs(found) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_layers_filter():
    found = names(fresh_model("stories"), target_names=(r"q_proj$",), layers=(1, 3))
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]


@pytest.mark.parametrize("roles,expected", [
    (("reader",), ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]),
    (("writer",), ["down_proj", "o_proj"]),
    (("reader", "writer"), sorted(PROJ)),
])
def test_roles(roles, expected):
    assert leafs(names(fresh_model("stories"), target_roles=roles)) == expected


def test_structural_matching_admits_a_linear_like_layer():
    found = names(ToyModel())
    assert found == sorted(f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "o_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("name", hook_only_methods())
def test_hook_only_methods_train_on_a_linear_like_layer(name):
    """Methods that never need a dense weight (so bitsandbytes layers can take them) run on any linear-like layer."""
    model = ToyModel()
    x = torch.randn(2, 3, 16)
    base = model(x)
    cfg = CASES[name].config("toy")
    cfg.target_names = (ll.ALL_LINEAR,)
    calibration = [torch.randn(2, 8, 16)] if needs_calibration(name) else None
    ll.attach(model, cfg, calibration_data=calibration)
    assert all(type(a.base).__name__ == "LinearLike" for a in adapter_layers(model).values())
    out = model(x)
    assert torch.allclose(out, base, rtol=0, atol=1e-6)
    out.square().sum().backward()
    model(x).square().sum().backward()  # a gradient within two steps, the matrix's rule (SingLoRA ramps in)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in grads)
    assert any(g is not None and g.abs().max() > 0 for g in grads.values())
