"""Reliability round 2 (issue 16), the runtime half: merge as a transaction (item 1), data-driven inits on
non-finite data (item 7), hostile target regexes (the "crashes" list). Each test names its item.

Written against the API every lora-lite version shares (attach/merge/detach on the default adapter, tensors
found by their state-dict names), so the same file runs against older code to show it failed there.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lora_lite as ll
from conftest import fresh_model
from model_state import assert_unchanged, fingerprint
from toy_models import ToyModel
from variant_cases import CASES

X = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
DATA_DRIVEN = sorted(n for n, m in ll.REGISTRY.items() if getattr(m, "requires_calibration", False))


@torch.no_grad()
def logits(model):
    return model(input_ids=X).logits


@torch.no_grad()
def perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


class InterruptNthWeightWrite(TorchFunctionMode):
    """Raise KeyboardInterrupt at the n-th `copy_` into one of `weights` (Ctrl-C in the middle of a write pass)."""

    def __init__(self, weights, n):
        super().__init__()
        self.ids, self.n, self.seen = {id(w) for w in weights}, n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and id(args[0]) in self.ids:
            self.seen += 1
            if self.seen == self.n:
                raise KeyboardInterrupt
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_item1_ctrl_c_in_the_merge_write_pass_changes_nothing(method):
    """Item 1: Ctrl-C after some layers were written used to leave them merged with the adapter still attached,
    and detach could not restore them. Now the model is exactly as before, and detach gives the exact base."""
    base = logits(fresh_model("qwen"))
    model = fresh_model("qwen")
    ll.attach(model, CASES[method].config("qwen"))
    perturb(model)
    hooked, state = logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    with pytest.raises(KeyboardInterrupt), InterruptNthWeightWrite(weights, n=3):
        ll.merge(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), hooked)
    ll.detach(model)
    assert torch.equal(logits(model), base)


def test_item1_interrupted_adapter_removal_puts_every_adapter_back(monkeypatch):
    """Item 1, the step after the writes: Ctrl-C while merge removes the merged adapters puts the weights and
    every adapter back (in its place, with its hooks), so nothing is applied twice or lost."""
    runtime = importlib.import_module("lora_lite.runtime")
    model = fresh_model("qwen")
    ll.attach(model, ll.LoRAConfig(r=2))
    ll.attach(model, ll.IA3Config(), name="gate")
    perturb(model)
    hooked, before = logits(model), fingerprint(model)
    real, calls = runtime._sync_hooks, {"n": 0}

    def interrupted(layer):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(layer)

    monkeypatch.setattr(runtime, "_sync_hooks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ll.merge(model)
    monkeypatch.undo()
    after = fingerprint(model)
    assert after["modules"] == before["modules"] and after["buffers"] == before["buffers"]
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items())
    assert torch.equal(logits(model), hooked) and ll.adapter_names(model) == ["default", "gate"]
    ll.merge(model)
    torch.testing.assert_close(logits(model), hooked, rtol=1e-5, atol=1e-5)


class ToyWithLoss(ToyModel):
    """The toy model returning a scalar loss, so gradient-based inits (LoRA-GA, LoRA-One) get one from a batch."""

    def forward(self, x):
        return super().forward(x).square().mean()


def toy_with_dense_layers():
    return ToyWithLoss(d=16, ff=32, linear=nn.Linear)


@pytest.mark.parametrize("method", DATA_DRIVEN)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "huge"])
def test_item7_non_finite_calibration_data_is_a_calibration_error(method, poison):
    """Item 7: EVA attached a NaN adapter from NaN batches; CorDA/ASVD raised a raw _LinAlgError. Every
    data-driven method (from the registry) now refuses the batches before decomposing anything; 1e30 is finite
    but its square overflows fp32 (in the input moments, or in the loss whose gradient LoRA-GA / LoRA-One take)."""
    model = toy_with_dense_layers()
    before = fingerprint(model)
    batch = torch.randn(2, 8, 16)
    batch[1, 3, 5] = poison
    cfg = ll.REGISTRY[method].config(r=2)
    with pytest.raises(ll.CalibrationError, match="NaN/inf, or values too large"):
        ll.attach(model, cfg, calibration_data=[batch])
    assert_unchanged(model, before)
    ll.attach(model, cfg, calibration_data=[torch.randn(2, 8, 16)])  # clean data still works
    assert all(torch.isfinite(t).all() for n, t in model.named_buffers() if "lora_" in n)


HOSTILE_PATTERNS = {
    "huge_count": ("a{4294967296}", "cannot be compiled"),
    "deep_nesting": ("(" * 3000 + "a" + ")" * 3000, "cannot be compiled|nested too deeply"),
    "nested_repeat": ("(.+)+X$", "exponential time"),
    "repeated_alternation": ("(a|ab)*c", "exponential time"),
    "many_repeats": (".*.*.*.*.*X", "polynomial time"),
    "backreference": (r"(\w+)\.\1", "backreference"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("field", ["target_names", "exclude_names"])
@pytest.mark.parametrize("case", sorted(HOSTILE_PATTERNS))
def test_crashes_hostile_regexes_are_config_errors(case, field):
    """Crashes: a{4294967296} raised OverflowError, 3000 nested groups RecursionError, and (.+)+X$ made attach
    run for minutes. Each is a ConfigError from the config itself, before any module name is matched."""
    pattern, match = HOSTILE_PATTERNS[case]
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoRAConfig(r=2, **{field: (pattern,)})


def test_target_patterns_people_write_still_work():
    model = fresh_model("qwen")
    patterns = (r"^model\.layers\.\d+\.self_attn\.(q|v)_proj$", r"(?!.*mlp).*o_proj", r"mlp\.(?:up|down)_proj$")
    ll.attach(model, ll.LoRAConfig(r=2, target_names=patterns))
    assert len(ll.runtime.adapter_layers(model)) == 2 * 5
