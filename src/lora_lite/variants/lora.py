"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.

    y' = y + s · (x Aᵀ) Bᵀ,      s = alpha / r   (alpha / √r with use_rslora: rsLoRA, arXiv 2312.03732)
    A: (r, d_in)  kaiming-uniform, trainable        B: (d_out, r)  zeros, trainable

Identity at init is exact because B = 0. Trainable params per layer: r·(d_in + d_out). Any r works, also
r > min(d_in, d_out) (as in PEFT). Hook-only (never reads W), so it works on bitsandbytes 4/8-bit layers.
Every layer kind (lora_lite.layer_kinds): x Aᵀ is `a.project(x, A)`, a conv with A as an r-channel kernel on
convs and a lookup of A's columns on embeddings (PEFT's lora.Conv2d and lora.Embedding), and on MoE expert
parameters each expert has its own A, B (lora_lite.experts). No dropout: it costs a copy of x per
layer and the benchmark protocols we follow use 0.
"""

from dataclasses import dataclass

import torch

from ..config import LowRankConfig
from ..variant import ParamSpec, as_dtype, register


@dataclass
class LoRAConfig(LowRankConfig):
    pass


def add_low_rank(base, h, B):
    """base + h Bᵀ, (..., d_out) + (..., r)(r, d_out), as one addmm pass in the wider of the two dtypes."""
    dtype = torch.promote_types(base.dtype, h.dtype)
    base, h, B = (as_dtype(t, dtype) for t in (base, h, B))
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), B.T)
    return out.view(*base.shape[:-1], -1)


def peft_lora(cfg, targets, **extra):
    """PEFT's LoraConfig with our r, alpha, rsLoRA flag and exact target names (shared by the LoRA family)."""
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, lora_dropout=0.0,
                           target_modules=list(targets), **extra)


@register
class LoRA:
    name = "lora"
    config = LoRAConfig
    paper = ("Hu+ 2021", "https://arxiv.org/abs/2106.09685")
    params_per_layer = "r·(d_in + d_out)"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}
    layer_kinds = ("linear", "conv1d_gpt2", "conv", "embedding", "experts")

    @staticmethod
    def peft(cfg, targets):
        return peft_lora(cfg, targets), "LoraConfig"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r + cfg.r * d_out  # x Aᵀ, · s, · Bᵀ

    @staticmethod
    def forward(a, x, y):
        # (..., d_in) -> (..., r), scaled on the small side, -> added into y
        return add_low_rank(y, a.project(x, a.lora_A) * a.cfg.scale, a.lora_B)

    @staticmethod
    def delta_weight(a):
        return a.cfg.scale * (a.lora_B.float() @ a.lora_A.float())

    @staticmethod
    def lora_factors(a):
        return a.lora_A.float(), a.lora_B.float(), a.cfg.scale
