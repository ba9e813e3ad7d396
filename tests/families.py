"""Tiny models of the families users bring, built from transformers 5 configs (no download), with one input batch
and the output tensor to compare. Used by tests/test_architectures.py.

Each family is as small as its config allows (hidden 32, two layers, a handful of experts) so the whole matrix
runs in CI. `config` is the adapter the family is tested with: LoRA under all-linear unless all-linear has
nothing to take (a conv net), with the task head trained whole where the model has one.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lora_lite as ll

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
VOCAB, SEQ, BATCH = 64, 8, 2


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    output: Callable[[object], torch.Tensor]  # model output -> the tensor compared
    config: Callable[[], ll.AdapterConfig] = lambda: ll.LoRAConfig(r=4, alpha=8)
    peft_task: str | None = None  # PEFT's task_type (SEQ_CLS leaves the head out of all-linear, as we do)
    # layers whose adapters PEFT's loader drops (export_peft refuses them): regex for exclude_names
    peft_drops: str | None = None


def _build(config_cls: str, model_cls: str, **kw) -> Callable[[], nn.Module]:
    @functools.cache
    def built():
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).float().eval()
        with torch.no_grad():  # random biases, so a dropped or rescaled bias shows up
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
        return model

    return lambda: copy.deepcopy(built())  # building from a config initialises every weight: do it once


def tokens(**extra) -> Callable[[], dict[str, torch.Tensor]]:
    def inputs():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return out | {k: v(g) for k, v in extra.items()}
    return inputs


def pixels(size=16, channels=3) -> Callable[[], dict[str, torch.Tensor]]:
    def inputs():
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=g)}
    return inputs


def logits(out):
    return out.logits


def hidden(out):
    return out.last_hidden_state


MOE = dict(DIMS, num_key_value_heads=1, num_experts_per_tok=2)
SEQ_CLS = dict(peft_task="SEQ_CLS", config=lambda: ll.LoRAConfig(r=4, alpha=8, modules_to_save=(r"^classifier$",)))

FAMILIES = [
    Family("gpt2", _build("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                          n_positions=32, bos_token_id=0, eos_token_id=0), tokens(), logits),
    Family("qwen3_moe", _build("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **MOE, head_dim=16, num_experts=4,
                               moe_intermediate_size=16), tokens(), logits),
    Family("mixtral", _build("MixtralConfig", "MixtralForCausalLM", **MOE, head_dim=16, num_local_experts=4),
           tokens(), logits),
    Family("deepseek_v3", _build("DeepseekV3Config", "DeepseekV3ForCausalLM", **MOE | dict(num_key_value_heads=2),
                                 moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                                 first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
           tokens(), logits, peft_drops=r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$"),
    Family("phimoe", _build("PhimoeConfig", "PhimoeForCausalLM", **MOE, num_local_experts=4), tokens(), logits),
    # experts stored transposed (E, d_in, d_out), with biases and an interleaved, clamped gate
    Family("gpt_oss", _build("GptOssConfig", "GptOssForCausalLM", **MOE | dict(intermediate_size=16), head_dim=16,
                             num_local_experts=4, layer_types=["sliding_attention", "full_attention"],
                             sliding_window=8), tokens(), logits),
    Family("qwen3_5", _build("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", **DIMS, num_key_value_heads=1, head_dim=16,
                             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
           tokens(), logits),
    Family("phi3", _build("Phi3Config", "Phi3ForCausalLM", **DIMS, num_key_value_heads=1, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2), tokens(), logits),
    Family("gemma3", _build("Gemma3TextConfig", "Gemma3ForCausalLM", **DIMS, num_key_value_heads=1, head_dim=16),
           tokens(), logits),
    Family("bert_seq_cls", _build("BertConfig", "BertForSequenceClassification", **DIMS, num_labels=2),
           tokens(), logits, **SEQ_CLS),
    Family("modernbert_seq_cls", _build("ModernBertConfig", "ModernBertForSequenceClassification", **DIMS,
                                        num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                                        local_attention=8), tokens(), logits, **SEQ_CLS),
    Family("t5", _build("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=64, num_layers=2, num_heads=2,
                        d_kv=16, vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0),
           tokens(decoder_input_ids=lambda g: torch.randint(3, VOCAB, (BATCH, 4), generator=g)), logits),
    Family("vit", _build("ViTConfig", "ViTForImageClassification", **{k: v for k, v in DIMS.items() if k != "vocab_size"},
                         image_size=16, patch_size=8, num_labels=3), pixels(), logits,
           config=lambda: ll.LoRAConfig(r=4, alpha=8, modules_to_save=(r"^classifier$",))),
    Family("clip", _build("CLIPConfig", "CLIPModel", projection_dim=16,
                          text_config=dict(DIMS, num_hidden_layers=1, max_position_embeddings=16),
                          vision_config={k: v for k, v in DIMS.items() if k != "vocab_size"} | dict(
                              num_hidden_layers=1, image_size=16, patch_size=8)),
           lambda: tokens()() | pixels()(), lambda out: out.logits_per_image),
    Family("siglip", _build("SiglipVisionConfig", "SiglipVisionModel", **{k: v for k, v in DIMS.items()
                                                                         if k != "vocab_size"},
                            image_size=16, patch_size=8), pixels(), lambda out: out.pooler_output),
    Family("resnet_conv2d", _build("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                                   hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), pixels(), logits,
           config=lambda: ll.LoRAConfig(r=4, alpha=8, target_names=(r"\.convolution$",),
                                        modules_to_save=(r"^classifier$",))),
]
BY_NAME = {f.name: f for f in FAMILIES}
