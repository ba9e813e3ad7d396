"""import_peft of adapters PEFT itself trained on every layer kind (not lora-lite exports): Conv1D with
fan_in_fan_out, convs, embeddings, expert parameters (target_parameters, nested ParamWrappers), modules_to_save
and trainable_token_indices. Each reproduces PEFT's outputs on the same base within 1e-5 relative."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_lite as ll
from families import BY_NAME
from lora_lite.runtime import adapter_extras, adapter_layers
from test_trainable_extras import tied_llama

peft = pytest.importorskip("peft")


def ids_batch():
    return {"input_ids": torch.tensor([[3, 9, 12, 5, 40, 7], [1, 2, 3, 4, 5, 6]])}


CASES = {
    "gpt2 Conv1D": (BY_NAME["gpt2"].build, ids_batch,
                    dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "resnet conv + head": (BY_NAME["resnet_conv2d"].build, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)},
                           dict(target_modules=["convolution"], modules_to_save=["classifier"])),
    "gemma3 embedding": (BY_NAME["gemma3"].build, ids_batch, dict(target_modules=["embed_tokens", "q_proj"])),
    "qwen3_moe experts": (BY_NAME["qwen3_moe"].build, ids_batch,
                          dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                             "mlp.experts.down_proj"])),
    "mixtral one expert param": (BY_NAME["mixtral"].build, ids_batch,
                                 dict(target_modules=[], target_parameters=["mlp.experts.down_proj"])),
    "llama token rows": (tied_llama, ids_batch, dict(target_modules=["v_proj"], trainable_token_indices=[3, 5])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_reproduces_a_peft_trained_adapter(case, tmp_path):
    build, batch, kwargs = CASES[case]
    base = build().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, **kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    ll.import_peft(ours, tmp_path / "peft")
    x = batch()
    with torch.no_grad():
        y_theirs, y_ours, y_base = (m(**x).logits for m in (theirs, ours, base))
    assert (y_theirs - y_base).abs().max() > 1e-3
    err = ((y_ours - y_theirs).abs().max() / y_theirs.abs().max()).item()
    assert err <= 1e-5, f"{case}: imported outputs differ from PEFT's by {err:.3g}"
    kinds = {a.kind for a in adapter_layers(ours).values()}
    expected = {"gpt2 Conv1D": {"conv1d_gpt2"}, "resnet conv + head": {"conv"}, "gemma3 embedding": {"embedding", "linear"},
                "qwen3_moe experts": {"experts", "linear"}, "mixtral one expert param": {"experts"},
                "llama token rows": {"linear"}}[case]
    assert kinds == expected
    assert bool(adapter_extras(ours)) == ("modules_to_save" in kwargs or "trainable_token_indices" in kwargs)


def test_an_embedding_saved_with_the_adapter_must_be_this_models(tmp_path):
    from safetensors.torch import load_file, save_file

    base = BY_NAME["gemma3"].build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    theirs.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))  # PEFT's save_embedding_layers
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(weights))
    with pytest.raises(ll.ConversionError, match="differs from this model's embedding"):
        ll.import_peft(base, tmp_path / "peft")
    assert not ll.adapter_names(base)
