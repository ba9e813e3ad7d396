"""DeLoRA: Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation", arXiv 2503.18225.

A LoRA whose update has a learnable, bounded strength λ, independent of the factors' scale:
    h  = (x ⊙ w) Aᵀ                                  w = ‖W‖ per input column (frozen buffer)
    y' = y + (h ⊙ (λ/r) / (‖A_k‖·‖B^k‖)) Bᵀ          norms clamped at ≥ 1e-4, as in PEFT
    ΔW = B diag(λ / (r‖A_k‖‖B^k‖)) A diag(w),  so ‖ΔW‖ ≤ λ·max(w)
    A: (r, d_in) kaiming   B: (d_out, r) zeros   λ: (1,) = lambda0   w: (d_in,) buffer

Matches PEFT's DeLoRA forward, in PEFT's order: folding w into A (x (A diag w)ᵀ) would save a copy of x per
layer, but moves λ's gradient, a sum with heavy cancellation, by ~1e-5 relative. Identity holds because
B = 0; B still gets a gradient at step 0 through the clamped norm, and A from step 1. λ0 must be > 0, or every
gradient is zero. Reads W once, at init (dequantized on bitsandbytes layers).
Mergeable, and exportable as a plain rank-r LoRA: A' = diag(λ/(r‖A_k‖‖B^k‖)) A diag(w), B' = B.
Trainable params per layer: r·(d_in + d_out) + 1. Needs a higher learning rate than LoRA (paper: 10-100x).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LowRankConfig
from ..errors import ConfigError
from ..quant import dense_weight
from ..variant import ParamSpec, register


@dataclass
class DeLoRAConfig(LowRankConfig):
    lambda0: float = 15.0


def _factor_scale(a):
    A, B = a.lora_A, a.lora_B
    return (a.lora_lambda / a.cfg.r) / (A.norm(dim=1).clamp_min(1e-4) * B.norm(dim=0).clamp_min(1e-4))


@register
class DeLoRA:
    name = "delora"
    config = DeLoRAConfig
    paper = ("Bini+ 2025", "https://arxiv.org/abs/2503.18225")
    params_per_layer = "r·(d_in + d_out) + 1"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-3, "stories": 1e-2, "tiny": 3e-2}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.DeloraConfig(r=cfg.r, delora_lambda=cfg.lambda0, target_modules=list(targets)), "DeloraConfig"

    @staticmethod
    def check(d_in, d_out, cfg):  # any r: the normalised factors need no r <= min(d_in, d_out)
        if cfg.use_rslora:
            raise ConfigError("delora: use_rslora does not apply; DeLoRA's strength is lambda0 (the update is "
                              "normalised and scaled by λ/r, never by alpha), so drop use_rslora and tune lambda0")
        if not cfg.lambda0 > 0:
            raise ConfigError(f"delora: lambda0={cfg.lambda0} must be > 0, otherwise no gradient reaches A or B")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros"),
                "lora_lambda": ParamSpec((1,), lambda t: t.fill_(cfg.lambda0)),
                "lora_wnorm": ParamSpec((d_in,), "ones", trainable=False, as_buffer=True)}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_in + cfg.r * d_in + cfg.r + cfg.r * d_out  # x ⊙ w, · Aᵀ, · λ/(r‖A‖‖B‖), · Bᵀ

    @staticmethod
    @torch.no_grad()
    def init(a):
        a.lora_wnorm.copy_(torch.linalg.vector_norm(dense_weight(a.base), dim=0))

    @staticmethod
    def forward(a, x, y):
        h = F.linear(x * a.lora_wnorm, a.lora_A) * _factor_scale(a)
        return y + F.linear(h, a.lora_B)

    @staticmethod
    def delta_weight(a):
        A, B = a.lora_A.float(), a.lora_B.float()
        return (B * _factor_scale(a).float()) @ A * a.lora_wnorm.float()

    @staticmethod
    def lora_factors(a):
        A = _factor_scale(a).float()[:, None] * a.lora_A.float() * a.lora_wnorm.float()
        return A, a.lora_B.float(), 1.0
