"""Bad input gives a clear LoraLiteError and leaves the model exactly as it was: same tensors bit for bit, same
requires_grad flags, no hooks, no lora_ attributes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from toy_models import ToyModel


def ghost_config() -> ll.AdapterConfig:
    """A config naming a method that is not registered (as a config class whose module registered nothing)."""

    @dataclass
    class GhostConfig(ll.AdapterConfig):
        variant = "ghost"

    return GhostConfig()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def traces(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            found.append(f"{name}: hooks")
        found += [f"{name}.{a}" for a in vars(m) if a.startswith(("lora_", "_lora"))]
        found += [f"{name}.{a}" for a in [*m._parameters, *m._buffers, *m._modules] if a.startswith("lora_")]
    return found


def assert_unchanged(model, before):
    state, flags = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert [k for k in state if not torch.equal(state[k], after[k])] == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert traces(model) == []


# (config, exception type, words the message must contain)
BAD = {
    "unknown variant": (ghost_config, ll.UnknownVariantError, r"unknown method 'ghost'.*registered"),
    "no target": (lambda: ll.LoRAConfig(target_names=(r"no_such_layer$",)), ll.TargetError,
                  r"no target layers matched.*q_proj"),
    "pissa r too large": (lambda: ll.PiSSAConfig(r=40), ll.ConfigError,
                          r"layer 'model\.layers\.0\.self_attn\.k_proj'.*r=40 exceeds min\(d_in, d_out\)=32"),
    "hra r too large": (lambda: ll.HRAConfig(r=130), ll.ConfigError, r"r=130 exceeds"),
    "hra odd r": (lambda: ll.HRAConfig(r=3), ll.ConfigError, r"r=3 is odd.*even"),
    "road odd group": (lambda: ll.RoadConfig(group_size=7), ll.ConfigError, r"group_size=7 must be positive and even"),
    "road group not dividing": (lambda: ll.RoadConfig(group_size=48), ll.ConfigError,
                                r"group_size=48 must divide.*d_out=(64|32|128)"),
    "road unknown variant": (lambda: ll.RoadConfig(road_variant="road_3", group_size=8), ll.ConfigError,
                             r"road_3.*road_1"),
    "delora lambda0=0": (lambda: ll.DeLoRAConfig(r=4, lambda0=0.0), ll.ConfigError, r"lambda0=0.0 must be > 0"),
    "delora lambda0<0": (lambda: ll.DeLoRAConfig(r=4, lambda0=-1.0), ll.ConfigError, r"lambda0=-1.0 must be > 0"),
    # methods-1 (issue 15, first half)
    "delora use_rslora": (lambda: ll.DeLoRAConfig(r=4, use_rslora=True), ll.ConfigError,
                          r"use_rslora does not apply.*lambda0"),
    "lora_fa r too large": (lambda: ll.LoRAFAConfig(r=40), ll.ConfigError, r"r=40 exceeds"),
    "olora r too large": (lambda: ll.OLoRAConfig(r=40), ll.ConfigError, r"r=40 exceeds"),
    "milora r too large": (lambda: ll.MiLoRAConfig(r=40), ll.ConfigError, r"r=40 exceeds"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_and_leaves_model_unchanged(case):
    make_cfg, exc, message = BAD[case]
    model = fresh_model("qwen")
    model.model.embed_tokens.weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(exc, match=message) as info:
        ll.attach(model, make_cfg())
    assert isinstance(info.value, ll.LoraLiteError)
    assert_unchanged(model, before)


@pytest.mark.parametrize("make_cfg", [lambda: ll.PiSSAConfig(r=2, target_names=(r"q_proj$",)),
                                      lambda: ll.DoRAConfig(r=2, target_names=(r"q_proj$",))],
                         ids=["pissa", "dora"])
def test_dense_weight_variants_reject_linear_like_layers(make_cfg):
    model = ToyModel()
    before = snapshot(model)
    with pytest.raises(ll.UnsupportedLayerError, match=r"LinearLike.*plain float nn.Linear") as info:
        ll.attach(model, make_cfg())
    assert isinstance(info.value, ll.LoraLiteError)
    assert_unchanged(model, before)


def test_attach_twice_raises_and_keeps_the_first_adapter():
    model = fresh_model("qwen")
    ll.attach(model, ll.LoRAConfig(r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # a non-identity adapter, so its outputs would show any change
    x = torch.arange(12).reshape(2, 6)
    state, flags = snapshot(model)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    out = model(input_ids=x).logits
    with pytest.raises(ll.AttachStateError, match=r"named 'default' is already attached.*detach") as info:
        ll.attach(model, ll.IA3Config())
    assert isinstance(info.value, ll.LoraLiteError)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert torch.equal(model(input_ids=x).logits, out)
    ll.detach(model)
    assert traces(model) == []
