"""merge() beyond the merged == hooked column of tests/test_invariants.py (refusals, PiSSA's residual, road_4),
and disabled(): the exact base model inside the block, the adapter back after it.
"""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import ids, logits, perturb, rel_err, trained
from variant_cases import CASES


def no_adapter_left(model):
    assert ll.runtime.get_state(model) is None
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not [k for k in vars(m) if k.startswith("_lora")]
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
    W_res, original = layer.weight.detach().clone(), layer._lora_base_weight.clone()
    expected = W_res + layer._lora_variant.delta_weight(layer).detach()
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
        model.model.layers[1].mlp.up_proj.lora_B[0, 0] = float("inf")
    poisoned = logits(model, x)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ll.ConversionError, match="non-finite.*nothing was changed"):
        ll.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, x).nan_to_num(), poisoned.nan_to_num()) and ll.runtime.get_state(model)
    with ll.disabled(model), pytest.raises(ll.AttachStateError, match="inside `with lora_lite.disabled"):
        ll.merge(model)
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
