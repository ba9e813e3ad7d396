"""merge() beyond the merged == hooked column of tests/test_invariants.py (refusals, PiSSA's residual, road_4),
and disabled(): the exact base model inside the block, the adapter back after it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import ids, logits, perturb, rel_err, trained
from variant_cases import CASES


def no_adapter_left(model):
    assert ll.adapter_names(model) == []
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "lora_adapters" not in m._modules
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert not [n for n, _ in model.named_buffers() if "lora_" in n]


def test_merge_road_4_with_bias():
    """road_4 (separate cos and sin angles) is not in the matrix; its merge rotates W and the bias."""
    model = trained("road", cfg=ll.RoadConfig(road_variant="road_4", group_size=8))
    x = ids()
    hooked = logits(model, x)
    ll.merge(model)
    no_adapter_left(model)
    assert rel_err(logits(model, x), hooked) <= 1e-5


def test_merge_pissa_keeps_residual_not_original():
    model = trained("pissa")
    layer = model.model.layers[0].self_attn.q_proj
    a = layer.lora_adapters.default
    W_res, original = layer.weight.detach().clone(), a.original_weight.clone()
    expected = W_res + a.variant.delta_weight(a).detach()
    ll.merge(model)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert not torch.allclose(layer.weight, original, atol=1e-3)


def test_merge_refusals_leave_the_model_untouched():
    with pytest.raises(ll.AttachStateError, match="no adapter"):
        ll.merge(fresh_model("qwen"))
    model = trained("lora")
    x = ids()
    before = logits(model, x)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.lora_adapters.default.lora_B[0, 0] = float("inf")
    poisoned = logits(model, x)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ll.ConversionError, match="non-finite.*nothing was changed"):
        ll.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, x).nan_to_num(), poisoned.nan_to_num()) and ll.adapter_names(model)
    assert not torch.equal(before, poisoned)


@pytest.mark.parametrize("case", sorted(CASES))
def test_disabled_gives_base_then_adapter_back(case):
    x = ids()
    base = logits(fresh_model("qwen"), x)
    model = trained(case)
    adapted = logits(model, x)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with ll.disabled(model) as m:
        assert m is model
        assert torch.equal(logits(model, x), base)
        with ll.disabled(model):  # nested: still off, and the inner exit does not switch it back on
            pass
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), adapted)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())


def test_disabled_is_exception_safe_and_builds_no_adapter_graph():
    model = trained("pissa")
    x = ids()
    adapted = logits(model, x)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ll.disabled(model):
        # a reference forward: the base is frozen and no adapter tensor enters the graph
        assert not model(input_ids=x).logits.requires_grad
        raise RuntimeError("boom")
    assert torch.equal(logits(model, x), adapted)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())


def test_detach_inside_disabled_gives_the_original_base():
    x = ids()
    base = logits(fresh_model("qwen"), x)
    model = trained("pissa")
    with ll.disabled(model):
        ll.detach(model)
    assert torch.equal(logits(model, x), base)
    no_adapter_left(model)


def test_disabled_then_merge_after_training_steps():
    """The adapter keeps training after a disabled block, and merge still matches the hooked model."""
    model = trained("dora")
    x = ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        with ll.disabled(model), torch.no_grad():
            ref = model(input_ids=x).logits
        loss = (model(input_ids=x).logits - ref).square().mean() - model(input_ids=x).logits.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    perturb(model, seed=3)
    hooked = logits(model, x)
    ll.merge(model)
    assert rel_err(logits(model, x), hooked) <= 1e-5


def test_interrupted_merge_rolls_back_every_written_layer(monkeypatch):
    """Ctrl-C in the middle of the write pass: the written layers are copied back, the adapter stays attached."""
    model = trained("pissa")
    x = ids()
    hooked = logits(model, x)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    merge_module = importlib.import_module("lora_lite.merge")  # the package's `merge` is the function
    calls = {"n": 0}
    real = merge_module._merged

    def interrupted(layer, adapters):
        calls["n"] += 1
        if calls["n"] == len(ll.runtime.adapter_layers(model)) + 5:  # pass 1 done, 5 layers written
            raise KeyboardInterrupt
        return real(layer, adapters)

    monkeypatch.setattr(merge_module, "_merged", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ll.merge(model)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
    assert torch.equal(logits(model, x), hooked) and ll.adapter_names(model) == ["default"]
    ll.detach(model)
    assert torch.equal(logits(model, x), logits(fresh_model("qwen"), x))


def test_merge_one_named_adapter_keeps_the_other():
    x = ids()
    model = trained("lora", seed=1)
    ll.attach(model, ll.IA3Config(), name="gate")
    perturb(model, seed=2, adapter="gate")
    hooked = logits(model, x)
    ll.merge(model, "default")  # acts first on its layers, so folding it leaves the gate's composition alone
    assert ll.adapter_names(model) == ["gate"]
    assert rel_err(logits(model, x), hooked) <= 1e-5
    ll.merge(model)
    no_adapter_left(model)
    assert rel_err(logits(model, x), hooked) <= 1e-5


def test_merge_of_stacked_adapters_follows_their_composition():
    """LoRA then IA3 on k/v: y = g ⊙ (W x + ΔW x); HRA on the input: W' = (W + ΔW) R. One merge folds all."""
    x = ids()
    model = trained("lora", seed=1)
    ll.attach(model, ll.IA3Config(), name="gate")
    ll.attach(model, ll.HRAConfig(r=2, target_names=(r"v_proj$",)), name="reflect")
    perturb(model, seed=2, std=0.05)
    hooked = logits(model, x)
    ll.merge(model)
    no_adapter_left(model)
    assert rel_err(logits(model, x), hooked) <= 1e-5


def test_merge_refuses_to_fold_a_later_non_additive_adapter_under_a_kept_one():
    model = trained("lora")
    ll.attach(model, ll.IA3Config(), name="gate")
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ll.AttachStateError, match="acts before it"):
        ll.merge(model, "gate")
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
