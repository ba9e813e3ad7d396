"""LoHa: Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", arXiv 2108.06098, as adapted by LyCORIS (Yeh et al. 2024, arXiv 2309.14859). Matches PEFT's LoHa.

The update is the Hadamard product of two rank-r matrices, so its rank reaches r²:
    ΔW = s · (B1 A1) ⊙ (B2 A2),   s = alpha / r
    B1, B2: (d_out, r)   A1, A2: (r, d_in)   all kaiming-uniform except A2 = 0 (PEFT's hada_w2_b), all trainable
PEFT's names: hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2.
Identity at init is exact because A2 = 0; A2 trains from step 0, the rest from step 1.
Forward through the Khatri-Rao identity (see abba.py), never building ΔW: (B1A1) ⊙ (B2A2) = B⋆ A⋆ with
A⋆ (r², d_in), B⋆ (d_out, r²), r²·(d_in + d_out) MACs per token. PEFT instead builds ΔW (d_out, d_in) each
call and pays d_in·d_out per token; this is cheaper while r² < d_in·d_out / (d_in + d_out).
Exactly low-rank: exports as a plain LoRA of rank r² (A⋆, B⋆, s). Same form as ABBA, other init and scale.
Hook-only: works on quantized layers. Trainable params per layer: 2r·(d_in + d_out).
"""

from dataclasses import dataclass

import torch.nn.functional as F

from ..config import LowRankConfig
from ..variant import ParamSpec, check_rank, register
from .abba import khatri_rao
from .lora import add_low_rank


@dataclass
class LoHaConfig(LowRankConfig):
    alpha: float = 8.0


@register
class LoHa:
    name = "loha"
    config = LoHaConfig
    paper = ("Hyeon-Woo+ 2022", "https://arxiv.org/abs/2108.06098")
    params_per_layer = "2r·(d_in + d_out)"
    bench = {"r": 8, "alpha": 8.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}

    check = staticmethod(check_rank)

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, target_modules=list(targets)), "LoHaConfig"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_B1": ParamSpec((d_out, cfg.r), "kaiming"), "lora_A1": ParamSpec((cfg.r, d_in), "kaiming"),
                "lora_B2": ParamSpec((d_out, cfg.r), "kaiming"), "lora_A2": ParamSpec((cfg.r, d_in), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        k = cfg.r * cfg.r
        return k * d_in + k + k * d_out  # x A⋆ᵀ, · s, · B⋆ᵀ (building A⋆, B⋆ is per call)

    @staticmethod
    def forward(a, x, y):
        A_star, B_star = khatri_rao(a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2)
        return add_low_rank(y, F.linear(x, A_star) * a.cfg.scale, B_star)

    @staticmethod
    def lora_factors(a):
        A_star, B_star = khatri_rao(*(t.float() for t in (a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2)))
        return A_star, B_star, a.cfg.scale

    @staticmethod
    def delta_weight(a):
        return a.cfg.scale * (a.lora_B1.float() @ a.lora_A1.float()) * (a.lora_B2.float() @ a.lora_A2.float())
