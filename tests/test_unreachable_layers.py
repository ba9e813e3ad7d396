"""Targeting never builds an adapter that would not run or would crash, and MoE expert parameters behave like any
other adapted layer (deepcopy, pickle, set_active, disabled, detach, files)."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from adapter_files import join, split
from families import BY_NAME
from lora_lite.runtime import adapter_layers
from model_state import assert_unchanged, fingerprint


def test_all_linear_leaves_out_the_mha_out_proj_and_says_so():
    siglip = BY_NAME["siglip"].build()
    with pytest.warns(ll.errors.SkippedLayersWarning, match=r"\['head\.attention\.out_proj'\]: nn\.MultiheadAttention "
                                                             r"reads out_proj\.weight and never calls out_proj"):
        ll.attach(siglip, ll.LoRAConfig(r=2))
    assert "head.attention.out_proj" not in adapter_layers(siglip)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for a in adapter_layers(siglip).values():
            a.lora_B.normal_(0, 0.1)
        hooked = siglip(pixel_values=x).pooler_output
        ll.merge(siglip)  # no dead adapter whose merge would change what the hooked model computed
        assert torch.allclose(siglip(pixel_values=x).pooler_output, hooked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,pattern,match", [
    ("siglip", r"head\.attention\.out_proj$", "never calls out_proj"),
    ("siglip", r"head\.attention$", "nn.MultiheadAttention, which computes with its in_proj_weight"),
    ("phimoe", r"mlp\.router$", r"PhimoeTopKRouter\.forward returns several values"),
])
def test_naming_an_unreachable_layer_is_refused_with_the_reason(family, pattern, match):
    model = BY_NAME[family].build()
    before = fingerprint(model)
    with pytest.raises(ll.TargetError, match=match):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(pattern,)))
    assert_unchanged(model, before)


class Pair(nn.Linear):
    """A router-like linear whose forward returns two values without a literal tuple lora-lite could see."""

    def forward(self, x):
        return _both(super().forward(x))


def _both(y):
    return tuple([y, y.softmax(-1)])


class Grouped(nn.Linear):
    def forward(self, x):
        return super().forward(x).unflatten(-1, (2, -1))


@pytest.mark.parametrize("layer,match", [(Pair(4, 6), "returned a tuple, not its output tensor"),
                                         (Grouped(4, 6), r"returned shape \(3, 2, 3\), not \(\.\.\., 6\)")])
def test_a_layer_that_is_not_what_it_seemed_fails_loudly_at_its_first_call(layer, match):
    net = nn.Sequential(layer)
    ll.attach(net, ll.LoRAConfig(r=2))
    with pytest.raises(ll.UnsupportedLayerError, match=match):
        net(torch.randn(3, 4))


def test_an_annotated_or_literal_tuple_forward_is_recognised():
    from lora_lite.target import returns_several_values

    class Annotated(nn.Linear):
        def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
            return _both(x)

    assert returns_several_values(Annotated(2, 2)) and not returns_several_values(nn.Linear(2, 2))
    assert not returns_several_values(Pair(2, 2))  # the hook's check at call time covers this one


def moe():
    return BY_NAME["qwen3_moe"].build()


IDS = torch.tensor([[5, 9, 12, 3, 40, 7], [1, 2, 3, 4, 5, 6]])
EXPERTS = "model.layers.0.mlp.experts"


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def experts_adapter(model, name="default"):
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), target_parameters=(r"experts\.down_proj$",)),
              name=name)
    with torch.no_grad():
        for a in adapter_layers(model, name).values():
            a.lora_B.normal_(0, 0.1)


def test_expert_parameters_copy_pickle_switch_and_detach_like_layers():
    model = moe()
    base, before = logits(model), fingerprint(model)
    experts_adapter(model)
    a = adapter_layers(model)[f"{EXPERTS}.lora_experts.down_proj"]
    assert a.lora_A.shape == (4, 2, 16) and a.lora_B.shape == (4, 32, 2)
    hooked = logits(model)
    assert (hooked - base).abs().max() > 1e-3
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(clone), hooked)
        with torch.no_grad():
            adapter_layers(clone)[f"{EXPERTS}.lora_experts.down_proj"].lora_B.zero_()
        assert torch.equal(logits(model), hooked)  # independent copies
    with ll.disabled(model):
        assert torch.equal(logits(model), base)  # the class's own forward runs again
    experts_adapter(model, "second")
    ll.set_active(model, "default")
    assert torch.equal(logits(model), hooked)
    with pytest.raises(ll.AttachStateError, match="per_row cannot route"):
        with ll.per_row(model, ["default", None]):
            pass
    with pytest.raises(ll.ConversionError, match="adapts expert parameters"):
        ll.add_weighted(model, {"default": 0.5}, name="half")
    ll.detach(model)
    assert_unchanged(model, before)
    assert "forward" not in model.get_submodule(EXPERTS).__dict__


def test_expert_targets_are_checked_at_load(tmp_path):
    model = moe()
    experts_adapter(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = moe()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh), logits(model))
    header, data = split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["adapters"])
    wrong = {k.replace("mlp.experts.lora_experts", "mlp.gate.lora_experts"): v for k, v in header.items()}
    meta["default"]["targets"] = [t.replace("mlp.experts.lora_experts", "mlp.gate.lora_experts")
                                  for t in meta["default"]["targets"]]
    wrong["__metadata__"]["adapters"] = json.dumps(meta)
    (tmp_path / "b.safetensors").write_bytes(join(wrong, data))
    other = moe()
    before = fingerprint(other)
    with pytest.raises(ll.CheckpointError, match=r"adapts 'model\.layers\.0\.mlp\.gate\.lora_experts\.down_proj', "
                                                  "which is not a layer lora-lite adapts"):
        ll.load(other, tmp_path / "b.safetensors")
    assert_unchanged(other, before)


def test_methods_without_the_experts_kind_skip_experts_under_all_linear():
    model = moe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll.attach(model, ll.DoRAConfig(r=2))
    (warning,) = [w for w in caught if issubclass(w.category, ll.errors.SkippedLayersWarning)]
    assert "4 layer(s)" in str(warning.message) and "these are experts" in str(warning.message)
    assert all(a.kind == "linear" for a in adapter_layers(model).values())


def test_a_file_with_two_adapters_on_one_expert_parameter_loads_both(tmp_path):
    model = moe()
    experts_adapter(model, "a")
    experts_adapter(model, "b")
    path = ll.save(model, tmp_path / "two.safetensors")
    fresh = moe()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh), logits(model))
    (holder,) = [m for n, m in fresh.named_modules() if n == f"{EXPERTS}.lora_experts"]
    assert set(holder["down_proj"].lora_adapters) == {"a", "b"}
    ll.detach(fresh, "a")
    ll.detach(model, "a")
    assert torch.equal(logits(fresh), logits(model))
