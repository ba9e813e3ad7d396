"""Rank above a layer's size, and per-layer r / alpha (rank_pattern, alpha_pattern), on a tiny Qwen3.5 whose
linear-attention `in_proj_a` / `in_proj_b` map 32 -> 2 (Qwen3.5's real ones: 1024 -> 16)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_lite as ll
from adapter_files import join, split
from families import BY_NAME
from lora_lite.io import read_adapter_file
from lora_lite.runtime import adapter_layers
from model_state import assert_unchanged, fingerprint

peft = pytest.importorskip("peft")
SMALL = "model.layers.0.linear_attn.in_proj_a"  # 32 -> 2
IDS = torch.tensor([[5, 9, 12, 3, 40, 7]])


def qwen35():
    return BY_NAME["qwen3_5"].build()


def out(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapter_layers(model).values():
            a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * 0.3)
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method", ["lora", "dora", "delora"])
def test_methods_whose_math_allows_it_take_r_above_a_layers_size(method):
    model = qwen35()
    ll.attach(model, ll.REGISTRY[method].config(r=8))
    a = adapter_layers(model)[SMALL]
    assert (a.d_in, a.d_out) == (32, 2) and a.lora_A.shape == (8, 32) and a.lora_B.shape == (2, 8)


@pytest.mark.parametrize("method", ["pissa", "lora_xs"])
def test_svd_methods_refuse_it_naming_the_layer_and_take_a_rank_pattern(method):
    model = qwen35()
    before = fingerprint(model)
    cfg = ll.REGISTRY[method].config
    with pytest.raises(ll.ConfigError, match=r"layer 'model\.layers\.0\.linear_attn\.in_proj_[ab]': .*r=8 exceeds "
                                             r"min\(d_in, d_out\)=2.*rank_pattern"):
        ll.attach(model, cfg(r=8))
    assert_unchanged(model, before)
    ll.attach(model, cfg(r=8, rank_pattern={r"in_proj_[ab]$": 2}))
    layers = adapter_layers(model)
    assert layers[SMALL].cfg.r == 2 and layers["model.layers.1.mlp.up_proj"].cfg.r == 8


def patterned():
    return ll.LoRAConfig(r=4, alpha=8, rank_pattern={r"in_proj_[ab]$": 2, r"\.mlp\.down_proj$": 6},
                         alpha_pattern={r"\.mlp\.down_proj$": 3.0, r"q_proj$": 20.0})


def test_rank_and_alpha_patterns_set_each_layers_r_and_scale():
    model = qwen35()
    ll.attach(model, patterned())
    layers = adapter_layers(model)
    assert layers[SMALL].lora_A.shape == (2, 32) and layers[SMALL].cfg.scale == 8 / 2
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.lora_A.shape == (6, 64) and down.cfg.scale == 3.0 / 6
    assert layers["model.layers.1.self_attn.q_proj"].cfg.scale == 20.0 / 4
    assert layers["model.layers.1.self_attn.k_proj"].cfg == layers["model.layers.1.self_attn.k_proj"].attached_cfg
    assert ll.runtime.adapter_config(model) == patterned()


def test_per_layer_values_are_saved_and_loaded_without_running_a_pattern(tmp_path):
    model = qwen35()
    ll.attach(model, patterned())
    randomize(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    (entry,) = read_adapter_file(path).values()
    assert entry[3]["layers"][SMALL] == {"r": 2}
    assert entry[3]["layers"]["model.layers.0.mlp.down_proj"] == {"r": 6, "alpha": 3.0}
    fresh = qwen35()
    ll.load(fresh, path)
    assert torch.equal(out(fresh), out(model))
    # the stored values decide, never the config's regexes: claim another r for a layer and the shapes disagree
    header, data = split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["adapters"])
    meta["default"]["layers"][SMALL] = {"r": 3}
    header["__metadata__"]["adapters"] = json.dumps(meta)
    (tmp_path / "b.safetensors").write_bytes(join(header, data))
    other = qwen35()
    before = fingerprint(other)
    with pytest.raises(ll.CheckpointError, match=rf"{SMALL}\.lora_A has shape \(2, 32\) .* needs \(3, 32\)"):
        ll.load(other, tmp_path / "b.safetensors")
    assert_unchanged(other, before)


@pytest.mark.parametrize("layers,match", [
    ({SMALL: {"r": 0}}, "r must be a positive int"),
    ({SMALL: {"rank": 2}}, "expected an object with some of"),
    ({"model.layers.9.mlp.up_proj": {"r": 2}}, "keyed by the adapter's targets"),
    ({SMALL: {"alpha": "8"}}, "alpha must be float"),
])
def test_malformed_per_layer_values_are_refused(layers, match, tmp_path):
    model = qwen35()
    ll.attach(model, ll.LoRAConfig(r=2))
    path = ll.save(model, tmp_path / "a.safetensors")
    header, data = split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["adapters"])
    meta["default"]["layers"] = layers
    header["__metadata__"]["adapters"] = json.dumps(meta)
    path.write_bytes(join(header, data))
    fresh = qwen35()
    before = fingerprint(fresh)
    with pytest.raises(ll.CheckpointError, match=match):
        ll.load(fresh, path)
    assert_unchanged(fresh, before)


def test_patterns_export_to_peft_and_back(tmp_path):
    model = qwen35()
    ll.attach(model, patterned())
    randomize(model)
    ll.export_peft(model, tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["rank_pattern"][r"model\.layers\.0\.linear_attn\.in_proj_a"] == 2
    theirs = peft.PeftModel.from_pretrained(qwen35(), tmp_path / "peft").eval()
    assert torch.allclose(out(theirs), out(model), rtol=0, atol=1e-5)
    again = qwen35()
    ll.import_peft(again, tmp_path / "peft")
    assert torch.equal(out(again), out(model))
    for lname, a in adapter_layers(again).items():
        assert (a.cfg.r, a.cfg.scale) == (adapter_layers(model)[lname].cfg.r, adapter_layers(model)[lname].cfg.scale)


def test_a_peft_adapter_with_patterns_and_rslora_imports_to_peft_outputs(tmp_path):
    base = qwen35()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj_a"], use_rslora=True,
                             rank_pattern={"in_proj_a": 2}, alpha_pattern={"v_proj": 3})
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    ll.import_peft(ours, tmp_path / "peft")
    assert torch.allclose(out(ours), out(theirs.eval()), rtol=0, atol=1e-5)
    assert adapter_layers(ours)[SMALL].lora_A.shape == (2, 32)


def test_a_plain_adapters_file_carries_none_of_the_later_fields(tmp_path):
    """So lora-lite versions from before layer kinds and patterns still read it."""
    from lora_lite.config import LATER_FIELDS

    model = qwen35()
    ll.attach(model, ll.LoRAConfig(r=2))
    header, _ = split(ll.save(model, tmp_path / "plain.safetensors").read_bytes())
    (entry,) = json.loads(header["__metadata__"]["adapters"]).values()
    assert set(entry) == {"config", "targets"} and not set(entry["config"]) & set(LATER_FIELDS)
    ll.detach(model)
    ll.attach(model, patterned())
    header, _ = split(ll.save(model, tmp_path / "patterned.safetensors").read_bytes())
    (entry,) = json.loads(header["__metadata__"]["adapters"]).values()
    assert {"rank_pattern", "alpha_pattern"} <= set(entry["config"]) and "layers" in entry


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("make_cfg", [
    lambda: ll.LilyConfig(r=4, stride_a=2, rank_pattern={rf"^{Q0}$": 2}),
    lambda: ll.VeRAConfig(r=8, rank_pattern={rf"^{Q0}$": 4}),
    lambda: ll.SHiRAConfig(r=4, rank_pattern={rf"^{Q0}$": 2}),
], ids=["lily", "vera", "shira"])
def test_methods_that_share_or_rebuild_state_across_layers_take_each_layers_r(make_cfg, tmp_path):
    """Lily ties tensors into several layers, VeRA and SHiRA rebuild theirs from the config (group_setup): each
    must use the layer's own r, also when load rebuilds them from the stored per-layer values."""
    from conftest import fresh_model

    base = fresh_model("qwen")
    ids = torch.tensor([[5, 9, 12, 3, 40, 7]])
    model = copy.deepcopy(base)
    ll.attach(model, make_cfg())
    layers = adapter_layers(model)
    assert layers[Q0].cfg.r < layers["model.layers.1.self_attn.q_proj"].cfg.r
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        trained = model(input_ids=ids).logits
        assert (trained - base(input_ids=ids).logits).abs().max() > 1e-3
    if make_cfg().variant == "lily":  # a layer of another rank is in a group of its own, never tied to r=4 ones
        assert layers[Q0].lora_B is not layers["model.layers.1.self_attn.q_proj"].lora_B
        assert layers["model.layers.0.self_attn.k_proj"].lora_B is layers["model.layers.1.self_attn.k_proj"].lora_B
    fresh = copy.deepcopy(base)
    ll.load(fresh, ll.save(model, tmp_path / "a.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained)


@pytest.mark.parametrize("method", ["lora_ga", "lora_one"])
def test_gradient_inits_take_each_layers_r(method):
    from conftest import fresh_model
    from variant_cases import gsm8k_batches

    model = fresh_model("qwen")
    cfg = ll.REGISTRY[method].config(r=4, alpha=8, rank_pattern={rf"^{Q0}$": 2})
    ll.attach(model, cfg, calibration_data=gsm8k_batches(model))
    layers = adapter_layers(model)
    assert layers[Q0].lora_A.shape[0] == 2 and layers["model.layers.1.self_attn.q_proj"].lora_A.shape[0] == 4
    assert all(torch.isfinite(a.lora_A).all() and a.lora_A.abs().max() > 0 for a in layers.values())
