"""LoHa: Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", arXiv 2108.06098, as adapted by LyCORIS (Yeh et al. 2024, arXiv 2309.14859). Matches PEFT's LoHa.

The update is the Hadamard product of two rank-r matrices, so its rank reaches r²:
    ΔW = s · (B1 A1) ⊙ (B2 A2),   s = alpha / r   (alpha / √r with use_rslora)
    B1, B2: (d_out, r)   A1, A2: (r, d_in)   all kaiming-uniform except A2 = 0 (PEFT's hada_w2_b), all trainable
PEFT's names: hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2.
Identity at init is exact because A2 = 0; A2 trains from step 0, the rest from step 1.
Forward through the Khatri-Rao identity (see abba.py): (B1A1) ⊙ (B2A2) = B⋆ A⋆ with A⋆ (r², d_in), B⋆ (d_out,
r²), r²·(d_in + d_out) MACs per token and no (d_out, d_in) matrix, where that is cheaper than PEFT's way (build
ΔW per call, d_in·d_out MACs per token), i.e. while r² ≤ d_in·d_out / (d_in + d_out); PEFT's way otherwise.
Exactly low-rank: exports as a plain LoRA of rank r² (A⋆, B⋆, s). Same form as ABBA, other init and scale.
Hook-only: works on quantized layers. Trainable params per layer: 2r·(d_in + d_out).
"""

import math
from dataclasses import dataclass

from ..config import LowRankConfig
from ..variant import ParamSpec, check_rank, register
from .abba import add_hadamard, hadamard_macs, khatri_rao


@dataclass
class LoHaConfig(LowRankConfig):
    alpha: float = 8.0


def lycoris_alpha(cfg) -> float:
    """The alpha that gives PEFT's LyCORIS layers (LoHa, LoKr: s = alpha / r, no rsLoRA option) our scale:
    with use_rslora, s = alpha / √r = (alpha·√r) / r."""
    return cfg.alpha * math.sqrt(cfg.r) if cfg.use_rslora else cfg.alpha


@register
class LoHa:
    name = "loha"
    config = LoHaConfig
    paper = ("Hyeon-Woo+ 2022", "https://arxiv.org/abs/2108.06098")
    layer_kinds = ("linear",)
    params_per_layer = "2r·(d_in + d_out)"
    bench = {"r": 8, "alpha": 8.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}

    check = staticmethod(check_rank)

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.LoHaConfig(r=cfg.r, alpha=lycoris_alpha(cfg), target_modules=list(targets)), "LoHaConfig"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_B1": ParamSpec((d_out, cfg.r), "kaiming"), "lora_A1": ParamSpec((cfg.r, d_in), "kaiming"),
                "lora_B2": ParamSpec((d_out, cfg.r), "kaiming"), "lora_A2": ParamSpec((cfg.r, d_in), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return hadamard_macs(d_in, d_out, cfg.r * cfg.r)  # building A⋆, B⋆ or ΔW is per call

    @staticmethod
    def forward(a, x, y):
        return add_hadamard(y, x, a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2, a.cfg.scale)

    @staticmethod
    def lora_factors(a):
        A_star, B_star = khatri_rao(*(t.float() for t in (a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2)))
        return A_star, B_star, a.cfg.scale

    @staticmethod
    def delta_weight(a):
        return a.cfg.scale * (a.lora_B1.float() @ a.lora_A1.float()) * (a.lora_B2.float() @ a.lora_A2.float())
