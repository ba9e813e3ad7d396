"""bitsandbytes 4-bit (nf4) and 8-bit bases on the CPU: hook-only variants attach, train and round-trip through
save/load; dense-weight variants and merge() refuse before changing anything.

Printed as `MEASURED bnb<bits> <variant> loss <first> -> <last> reload <max |Δlogits|>`.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import lora_lite as ll
from conftest import gsm8k_rows, require_asset, stories_tokenizer
from lora_lite.quant import dense_weight
from lora_lite.shared_data import stories260k_dir
from lora_lite.variant import hook_only_methods
from variant_cases import CASES

pytest.importorskip("bitsandbytes")
STEPS = 20
# Which methods run on a quantized base comes from their registration; configs and lrs from the invariant matrix's
# cases for stories260K (RoAd groups of 4 divide its 64/32/172 dims).
HOOK_ONLY = hook_only_methods()
DENSE_ONLY = sorted(set(ll.REGISTRY) - set(HOOK_ONLY))


def calibration_for(cfg):
    """Two GSM8K batches for data-driven variants (EVA, CorDA, ASVD), None for the others."""
    if not getattr(ll.REGISTRY[cfg.variant], "requires_calibration", False):
        return None
    b = batch()
    return [{"input_ids": b["input_ids"][i:i + 2], "attention_mask": b["attention_mask"][i:i + 2]} for i in (0, 2)]
BITS = [4, 8]


def load_bnb(bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    require_asset(stories260k_dir() / "model.safetensors")
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir(), quantization_config=q, device_map="cpu")
    # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first eval-mode no-grad forward (a calibration
    # pass is one), and asserts for out_features % 32 != 0 (gate/up_proj: 172). Switch that path off so every CPU
    # runs the same dequantize-and-matmul path; test_dense_weight_unpacks_... turns it back on for one layer.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@functools.cache
def batch():
    tok = stories_tokenizer()
    enc = tok([r["question"] for r in gsm8k_rows("train", 4)], return_tensors="pt", padding=True, truncation=True,
              max_length=32)
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def out(model):
    b = batch()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def quantized_weights(model):
    return {n: m.weight.data.clone() for n, m in model.named_modules() if n and hasattr(m, "weight")
            and m.weight is not None and not m.weight.dtype.is_floating_point}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", HOOK_ONLY)
def test_hook_variants_train_and_reload(case, bits, tmp_path):
    lr = CASES[case].lr
    torch.manual_seed(0)
    model = load_bnb(bits)
    frozen = quantized_weights(model)
    cfg = CASES[case].config("stories")
    ll.attach(model, cfg, calibration_data=calibration_for(cfg))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    opt = CASES[case].optimizer(params.values(), lr=lr)  # the lr is the case's for its optimizer
    got_grad, losses = dict.fromkeys(params, False), []
    for _ in range(STEPS):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        for n, p in params.items():
            got_grad[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(**batch()).loss.item())
    assert all(got_grad.values()), f"no gradient reached {[n for n, g in got_grad.items() if not g][:3]}"
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(t, quantized_weights(model)[n]) for n, t in frozen.items())

    ll.save(model, tmp_path / "a.safetensors")
    fresh = load_bnb(bits)
    ll.load(fresh, tmp_path / "a.safetensors")
    err = (out(fresh) - out(model)).abs().max().item()
    print(f"MEASURED bnb{bits} {case} loss {losses[0]:.3f} -> {losses[-1]:.3f} reload {err:.1e}")
    assert err == 0.0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", DENSE_ONLY)
def test_dense_variants_refuse_before_changing_anything(case, bits):
    model = load_bnb(bits)
    before, logits = quantized_weights(model), out(model)
    cfg = CASES[case].config("stories")
    with pytest.raises(ll.UnsupportedLayerError, match=f"{case}.*Linear{bits}"):
        ll.attach(model, cfg, calibration_data=calibration_for(cfg))
    assert ll.adapter_names(model) == []
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(t, quantized_weights(model)[n]) for n, t in before.items())
    assert torch.equal(out(model), logits)


def test_dense_weight_unpacks_a_cpu_repacked_4bit_weight():
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16; this one has none")
    layer = load_bnb(4).model.layers[0].self_attn.q_proj.eval()  # 64 outputs: a multiple of the 32-row block
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(5, layer.in_features)
    before = dense_weight(layer)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    after = dense_weight(layer)  # the block scales were rounded to bf16 by the repacking
    assert torch.allclose(after, before, rtol=2**-8, atol=0)
    # the repacked kernel computes in bf16: agreement to bf16 accuracy, relative to the output's scale
    assert (y.float() - F.linear(x, after)).abs().max() <= 2e-2 * y.float().abs().max()
    assert layer.weight.quant_state.packing_format_for_cpu  # the layer itself was left packed


@pytest.mark.parametrize("bits", BITS)
def test_dense_weight_is_what_the_layer_multiplies_by(bits):
    from conftest import load_stories260k

    layer = load_bnb(bits).model.layers[0].mlp.down_proj
    W = dense_weight(layer)
    original = load_stories260k().model.layers[0].mlp.down_proj.weight
    assert W.shape == original.shape and W.dtype == torch.float32
    if bits == 4:  # the 4-bit forward dequantizes and multiplies in fp32: exactly F.linear with W
        x = torch.randn(5, layer.in_features)
        assert torch.equal(layer(x), F.linear(x, W))
        assert (W - original).abs().max() < 0.2 * original.abs().max()
    else:  # int8 rows of the fp16-loaded W0: W = round(W0 · 127 / absmax) · absmax / 127, within half a step
        step = layer.weight.SCB[:, None] / 127
        assert ((W - original.detach().half().float()).abs() <= step / 2 + 1e-6).all()


def test_merge_refuses_and_disabled_works_on_a_quantized_base():
    model = load_bnb(4)
    base = out(model)
    ll.attach(model, ll.LoRAConfig(r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    adapted = out(model)
    with pytest.raises(ll.UnsupportedLayerError, match="load the base unquantized"):
        ll.merge(model)
    assert torch.equal(out(model), adapted) and ll.adapter_names(model) == ["default"]
    with ll.disabled(model):
        assert torch.equal(out(model), base)
    assert torch.equal(out(model), adapted)
