"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.

    y' = y + s · (x Aᵀ) Bᵀ,      s = alpha / r
    A: (r, d_in)  kaiming-uniform, trainable        B: (d_out, r)  zeros, trainable

Identity at init is exact because B = 0. Trainable params per layer: r·(d_in + d_out).
Hook-only (never reads W), so it works on bitsandbytes 4/8-bit layers. No dropout: it costs a copy of x per
layer and the benchmark protocols we follow use 0.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..variant import ParamSpec, check_rank, register


@dataclass
class LoRAConfig(AdapterConfig):
    variant = "lora"


def add_low_rank(base, h, B):
    """base + h Bᵀ, (..., d_out) + (..., r)(r, d_out), as one addmm pass in the wider of the two dtypes."""
    dtype = torch.promote_types(base.dtype, h.dtype)
    out = torch.addmm(base.reshape(-1, base.shape[-1]).to(dtype), h.reshape(-1, h.shape[-1]).to(dtype), B.T.to(dtype))
    return out.view(*base.shape[:-1], -1)


@register
class LoRA:
    name = "lora"
    config = LoRAConfig

    check = staticmethod(check_rank)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r + cfg.r * d_out  # x Aᵀ, · s, · Bᵀ

    @staticmethod
    def init(layer, cfg):
        pass  # ParamSpec already holds the whole init

    @staticmethod
    def forward(layer, x, y):
        # (..., d_in) -> (..., r), scaled on the small side, -> added into y
        return add_low_rank(y, F.linear(x, layer.lora_A) * layer._lora_cfg.scale, layer.lora_B)

    @staticmethod
    def delta_weight(layer):
        return layer._lora_cfg.scale * (layer.lora_B.float() @ layer.lora_A.float())

    @staticmethod
    def lora_factors(layer):
        return layer.lora_A.float(), layer.lora_B.float(), layer._lora_cfg.scale
