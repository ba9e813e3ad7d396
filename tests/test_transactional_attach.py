"""attach is a transaction: a failure at any stage leaves the model bit-identical, with nothing added.

A test-only variant (PiSSA's layout, so it rewrites W through base_delta and has buffers) fails on demand at
each stage the runtime goes through, after some layers were already modified. A real variant covers the
checks that must refuse before anything is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lora_lite as ll
from conftest import fresh_model
from lora_lite import runtime
from lora_lite.variant import ParamSpec
from lora_lite.variants.pissa import PiSSA, PiSSAConfig
from model_state import assert_unchanged, fingerprint

FAULT = {"stage": None, "after": 0, "calls": 0, "exc": RuntimeError}


def _maybe_fail(stage):
    if FAULT["stage"] != stage:
        return
    FAULT["calls"] += 1
    if FAULT["calls"] > FAULT["after"]:
        FAULT["stage"] = "fired"  # once: the rollback passes through the same code
        raise FAULT["exc"](f"injected failure in {stage}")


def _spec_init(t):
    _maybe_fail("spec")
    t.normal_()


@dataclass
class FaultyConfig(PiSSAConfig):
    variant = "test_faulty"


class Faulty:
    name = "test_faulty"
    config = FaultyConfig
    paper = ("test", "-")
    params_per_layer = "r·(d_in + d_out)"
    needs_dense_weight = True
    forward = staticmethod(PiSSA.forward)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**PiSSA.param_specs(d_in, d_out, cfg), "lora_extra": ParamSpec((4,), _spec_init)}

    @staticmethod
    @torch.no_grad()
    def init(a):
        """PiSSA's layout with random factors instead of an SVD (slow under CPU contention, and not under test)."""
        for name in ("lora_A", "lora_B"):
            getattr(a, name + "0").normal_(0, 0.1)
            getattr(a, name).copy_(getattr(a, name + "0"))
        _maybe_fail("init")

    @staticmethod
    def base_delta(a):
        _maybe_fail("base_delta")
        return PiSSA.base_delta(a)

    @staticmethod
    def group_init(model, adapters, cfg, data):
        """Misbehaves on purpose before failing: its own hook, attributes, a buffer, a flag, train mode."""
        if FAULT["stage"] != "group_init":
            return
        model.model.layers[0].register_forward_hook(lambda *a: None)
        model.model.layers[0].register_forward_pre_hook(lambda *a: None)
        layer = adapters[0].base
        layer.register_buffer("calibration_stats", torch.ones(3))
        layer.scratch = torch.zeros(2)
        model.calibrated = True
        model.model.embed_tokens.weight.requires_grad_(True)
        model.train()
        _maybe_fail("group_init")


@pytest.fixture
def faulty():
    ll.register(Faulty)
    FAULT.update(stage=None, after=0, calls=0, exc=RuntimeError)
    yield
    ll.REGISTRY.pop(Faulty.name, None)


def _model():
    model = fresh_model("qwen")
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern of flags to restore
    return model


CFG = dict(r=2, target_names=(r"proj$",))


def test_faulty_variant_works_when_no_fault(faulty):
    model = _model()
    before = fingerprint(model)
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        y0 = model(x).logits
        ll.attach(model, FaultyConfig(**CFG))
        assert len(runtime.adapter_layers(model)) == 14
        torch.testing.assert_close(model(x).logits, y0, atol=1e-4, rtol=0)  # PiSSA identity
    ll.detach(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("stage,after,exc", [
    ("spec", 5, RuntimeError),         # mid-way through creating tensors, layer 6 of 14
    ("init", 0, RuntimeError),
    ("init", 9, KeyboardInterrupt),    # Ctrl-C after 9 layers were initialised
    ("base_delta", 4, RuntimeError),   # 4 weights already rewritten to W - base_delta
    ("hook", 7, RuntimeError),         # 7 hooks already registered
    ("group_init", 0, ll.CalibrationError),
    ("group_init", 0, KeyboardInterrupt),
])
def test_failure_at_any_stage_leaves_model_identical(faulty, monkeypatch, stage, after, exc):
    FAULT.update(stage=stage, after=after, exc=exc)
    if stage == "hook":
        sync = runtime._sync_hooks

        def failing_sync(layer):
            _maybe_fail("hook")
            return sync(layer)
        monkeypatch.setattr(runtime, "_sync_hooks", failing_sync)
    model = _model()
    before = fingerprint(model)
    with pytest.raises(exc, match="injected failure"):
        ll.attach(model, FaultyConfig(**CFG))
    assert FAULT["calls"] == after + 1, "the fault fired at the wrong point"
    assert_unchanged(model, before)
    # the model is still fully usable: an adapter attaches and detaches cleanly afterwards
    FAULT["stage"] = None
    ll.attach(model, FaultyConfig(**CFG))
    ll.detach(model)
    assert_unchanged(model, before)


class FakeQuantLinear(nn.Module):
    """Linear-like (in/out_features, weight) but not a dense float nn.Linear, like bitsandbytes layers."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.T.to(x.dtype)


@pytest.mark.parametrize("make_cfg,error", [
    (lambda: ll.PiSSAConfig(r=65), ll.ConfigError),                      # r > min(d_in, d_out) = 64
    (lambda: ll.HRAConfig(r=3), ll.ConfigError),                         # odd r
    (lambda: ll.RoadConfig(group_size=48), ll.ConfigError),              # does not divide d_out
    (lambda: ll.DeLoRAConfig(r=4, lambda0=0.0), ll.ConfigError),
    (lambda: ll.PiSSAConfig(r=4, svd="qr"), ll.ConfigError),
    (lambda: ll.LoRAConfig(target_names=("nothing_matches",)), ll.TargetError),
    (lambda: ll.DoRAConfig(r=4), ll.UnsupportedLayerError),              # the last layer is quantized
    ("not a config", ll.ConfigError),
])
def test_refused_configs_touch_nothing(make_cfg, error):
    model = _model()
    model.model.layers[1].mlp.down_proj = FakeQuantLinear(model.model.layers[1].mlp.down_proj)
    before = fingerprint(model)
    cfg = make_cfg() if callable(make_cfg) else make_cfg
    with pytest.raises(error) as info:
        ll.attach(model, cfg)
    assert isinstance(info.value, ll.LoraLiteError)
    assert_unchanged(model, before)


def test_calibration_variant_without_data_touches_nothing(faulty):
    Faulty.requires_calibration = True
    try:
        model = _model()
        before = fingerprint(model)
        with pytest.raises(ll.CalibrationError, match="calibration_data"):
            ll.attach(model, FaultyConfig(**CFG))
        assert_unchanged(model, before)
    finally:
        del Faulty.requires_calibration


def test_a_second_name_attaches_and_the_same_name_is_refused_untouched():
    model = _model()
    ll.attach(model, ll.LoRAConfig(r=2))
    before = fingerprint(model)
    with pytest.raises(ll.AttachStateError, match="already attached; pick another name"):
        ll.attach(model, ll.LoRAConfig(r=4))
    assert_unchanged_modules(model, before)
    ll.attach(model, ll.LoRAConfig(r=4), name="second")
    assert ll.adapter_names(model) == ["default", "second"]


def assert_unchanged_modules(model, before):
    after = fingerprint(model)
    assert after["modules"] == before["modules"] and after["params"] == before["params"]


def test_attaching_below_or_above_an_adapted_module_follows_the_same_rules():
    """A sub-module and the whole model are one model: one name once, one weight-rewriting adapter per layer."""
    model = _model()
    block = model.model.layers[0]
    ll.attach(block, ll.LoRAConfig(r=2))
    before = fingerprint(model)
    with pytest.raises(ll.AttachStateError, match="already"):
        ll.attach(model, ll.LoRAConfig(r=2))  # above: the whole model, same name
    assert_unchanged_modules(model, before)
    ll.attach(model, ll.PiSSAConfig(r=2), name="pissa")  # above, another name: allowed
    before = fingerprint(model)
    with pytest.raises(ll.AttachStateError, match="rewrites its weight"):
        ll.attach(block, ll.PiSSAConfig(r=2), name="pissa2")  # below: a second W-rewriting adapter on a layer
    assert_unchanged_modules(model, before)
    assert ll.adapter_names(model) == ["default", "pissa"] and ll.adapter_names(block) == ["default", "pissa"]


def test_one_module_under_two_names_is_adapted_once():
    model = _model()
    model.model.alias = model.model.layers[0].self_attn.q_proj  # the same module registered twice
    added = ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$", r"alias$")))
    assert len(added) == 2 and len({id(a.base) for a in added}) == 2  # layers 0 and 1, layer 0 once
