"""Several named adapters on one model: switching, routing per row, weighted combinations, and fp32 master
tensors on a bf16 base. The per-method columns (two adapters, per_row, deepcopy, ...) are in test_invariants."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model, load_stories260k
from deploy_cases import ids, logits, perturb, rel_err
from lora_lite.runtime import adapter_layers


def two_loras(ranks=(4, 2)):
    model = fresh_model("qwen")
    for i, (name, r) in enumerate(zip("ab", ranks, strict=True)):
        ll.attach(model, ll.LoRAConfig(r=r, alpha=2 * r, target_names=(r"q_proj$", r"v_proj$") if i else ()),
                  name=name)
        perturb(model, seed=i, std=0.05, adapter=name)
    return model


def weighted_delta(model, weights, layer_name):
    total = 0
    for name, w in weights.items():
        layers = adapter_layers(model, name)
        if layer_name in layers:
            A, B, s = layers[layer_name].variant.lora_factors(layers[layer_name])
            total = total + w * s * B @ A
    return total


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_add_weighted_is_exactly_the_weighted_sum(how):
    model = two_loras()
    weights = {"a": 0.7, "b": -0.3}
    ll.add_weighted(model, weights, name="ab", how=how, r=6 if how == "svd" else None)
    for lname, a in adapter_layers(model, "ab").items():
        A, B, s = a.variant.lora_factors(a)
        expected = weighted_delta(model, weights, lname)
        assert torch.allclose(s * B @ A, expected, atol=1e-6), lname  # rank 4 + 2 ≤ 6: svd is exact too
    # the combined adapter alone equals the base plus the weighted sum of the two adapters' changes
    x = ids()
    ll.set_active(model, "ab")
    combined = logits(model, x)
    ll.set_active(model, [])
    reference = fresh_model("qwen")
    with torch.no_grad():
        for lname in adapter_layers(model, "ab"):
            reference.get_submodule(lname).weight += weighted_delta(model, weights, lname)
    assert rel_err(combined, logits(reference, x)) <= 1e-5


def test_add_weighted_svd_truncates_to_the_best_rank_r():
    model = two_loras()
    ll.add_weighted(model, {"a": 1.0, "b": 1.0}, name="ab", how="svd", r=2)
    lname = "model.layers.0.self_attn.q_proj"
    a = adapter_layers(model, "ab")[lname]
    A, B, s = a.variant.lora_factors(a)
    target = weighted_delta(model, {"a": 1.0, "b": 1.0}, lname)
    S = torch.linalg.svdvals(target)
    assert torch.allclose((s * B @ A - target).norm(), S[2:].norm(), rtol=1e-4)  # Eckart-Young


def test_add_weighted_linear_is_exact_on_a_shared_factor_and_refuses_cross_terms():
    model = fresh_model("qwen")
    for name in "ab":
        ll.attach(model, ll.LoRAConfig(r=4, target_names=(r"q_proj$",)), name=name)
    with torch.no_grad():  # share A (as LoRA-FA adapters from one init do), different B
        for lname, a in adapter_layers(model, "b").items():
            a.lora_A.copy_(adapter_layers(model, "a")[lname].lora_A)
    perturb(model, seed=0, std=0.05, adapter="a")  # moves A of "a" too: no longer shared
    with pytest.raises(ll.ConversionError, match="cross terms"):
        ll.add_weighted(model, {"a": 0.5, "b": 0.5}, name="ab", how="linear")
    assert ll.adapter_names(model) == ["a", "b"]
    with torch.no_grad():
        for lname, a in adapter_layers(model, "b").items():
            a.lora_A.copy_(adapter_layers(model, "a")[lname].lora_A)
            a.lora_B.normal_(0, 0.05)
    ll.add_weighted(model, {"a": 0.5, "b": 0.5}, name="ab", how="linear")
    for lname, a in adapter_layers(model, "ab").items():
        A, B, s = a.variant.lora_factors(a)
        assert A.shape[0] == 4 and torch.allclose(s * B @ A, weighted_delta(model, {"a": 0.5, "b": 0.5}, lname),
                                                  atol=1e-6)


def test_add_weighted_of_a_weight_rewriting_adapter_is_against_the_original_weight():
    model = fresh_model("qwen")
    ll.attach(model, ll.PiSSAConfig(r=4, target_names=(r"q_proj$",)), name="p")
    perturb(model, seed=0, std=0.05, adapter="p")
    x = ids()
    pissa_alone = logits(model, x)
    ll.add_weighted(model, {"p": 1.0}, name="copy", how="cat")
    ll.set_active(model, "copy")  # pissa off: W is the original, and the plain LoRA reproduces pissa exactly
    assert rel_err(logits(model, x), pissa_alone) <= 1e-5


def test_add_weighted_refusals():
    model = two_loras()
    ll.attach(model, ll.IA3Config(), name="gate")
    with pytest.raises(ll.ConversionError, match="no low-rank form"):
        ll.add_weighted(model, {"a": 1.0, "gate": 1.0}, name="x")
    with pytest.raises(ll.ConfigError, match="must name attached adapters"):
        ll.add_weighted(model, {"nope": 1.0}, name="x")
    with pytest.raises(ll.AttachStateError, match="already attached"):
        ll.add_weighted(model, {"a": 1.0}, name="b")
    with pytest.raises(ll.ConfigError, match="how="):
        ll.add_weighted(model, {"a": 1.0}, name="x", how="ties")
    assert ll.adapter_names(model) == ["a", "b", "gate"]


def test_switching_errors_name_the_attached_adapters():
    model = two_loras()
    with pytest.raises(ll.AttachStateError, match=r"no adapter named \['c'\]; attached: \['a', 'b'\]"):
        ll.set_active(model, ["a", "c"])
    with pytest.raises(ll.AttachStateError, match="no adapter named 'c'"):
        ll.detach(model, "c")
    with pytest.raises(ll.AttachStateError, match="pass name= to pick one"):
        ll.runtime.adapter_layers(model)
    with pytest.raises(ll.ConfigError, match="letters, digits"):
        ll.attach(model, ll.LoRAConfig(), name="a.b")
    with pytest.raises(ll.AttachStateError, match=r"one adapter name \(or None\) per batch row"), ll.per_row(model, ["zz"]):
        pass
    with ll.per_row(model, ["a", "b"]), pytest.raises(ll.AttachStateError, match="one name per row"):
        model(input_ids=ids(n=3))


def test_detach_one_keeps_the_other_and_restores_flags_only_at_the_end():
    model = two_loras()
    x = ids()
    ll.set_active(model, "b")
    only_b = logits(model, x)
    ll.detach(model, "a")
    assert ll.adapter_names(model) == ["b"] and torch.equal(logits(model, x), only_b)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ll.detach(model)
    assert all(p.requires_grad for p in model.parameters())


def test_bf16_base_keeps_fp32_master_tensors_so_small_updates_land():
    """stories260K in bf16, the default LoRA config, 10 AdamW steps at lr 1e-4: every lora_A entry changes (a
    bf16 adapter loses most of those updates to rounding)."""
    model = load_stories260k(torch.bfloat16)
    ll.attach(model, ll.LoRAConfig())
    A0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_A")}
    assert A0 and all(t.dtype == torch.float32 for t in A0.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(10):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    unchanged = sum(int((params[n].detach() == A0[n]).sum()) for n in A0)
    assert unchanged == 0, f"{unchanged} of {sum(t.numel() for t in A0.values())} lora_A entries never changed"
