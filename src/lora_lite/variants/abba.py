"""ABBA: Singhal et al. 2025, "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models",
arXiv 2505.14238. Follows the authors' code (github.com/CERT-Lab/abba); PEFT has no ABBA.

The update is the Hadamard product of two learned low-rank matrices, so its rank reaches r·r2:
    ΔW = s · (B1 A1) ⊙ (B2 A2)           A1: (r, d_in) B1: (d_out, r)  A2: (r2, d_in) B2: (d_out, r2)
    s = alpha (the authors' code: √alpha1·√alpha2 with alpha1 = alpha2)
Init (the paper's): B1 = U√S, A1 = √S Vh from the top-r SVD of W (so B1 A1 is W's best rank-r part), A2
kaiming, B2 = 0. Identity at init is exact because B2 = 0; B2 trains from step 0, the others from step 1.
Forward through the Khatri-Rao identity (the paper's), never building a (d_out, d_in) matrix:
    (B1A1) ⊙ (B2A2) = B⋆ A⋆,  A⋆ = rows A1_p ⊙ A2_q (r·r2, d_in),  B⋆ = columns B1_p ⊙ B2_q (d_out, r·r2)
    y' = y + s · (x A⋆ᵀ) B⋆ᵀ          A⋆, B⋆ built per call; r·r2·(d_in + d_out) MACs per token
unless r·r2·(d_in + d_out) > d_in·d_out; then ΔW is built per call and applied densely (fewer MACs per token).
Either way the change is exactly low-rank: it exports as a plain LoRA of rank r·r2 (A⋆, B⋆, s).
Reads W once, at init (dequantized on bitsandbytes layers), so it works on quantized bases.
Trainable params per layer: (r + r2)·(d_in + d_out); the paper takes r = r2 = half a LoRA's rank.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..quant import dense_weight
from ..svd import SVDInitConfig, check_svd_init, top_r_svd
from ..variant import ParamSpec, register
from .lora import add_low_rank


@dataclass
class ABBAConfig(SVDInitConfig):
    """r2=None means r2 = r."""

    r: int = 16
    r2: int | None = None
    alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.r2 is None:
            self.r2 = self.r
        super().__post_init__()


def khatri_rao(A1, B1, A2, B2) -> tuple[torch.Tensor, torch.Tensor]:
    """(A⋆ (r·r2, d_in), B⋆ (d_out, r·r2)) with B⋆ A⋆ = (B1 A1) ⊙ (B2 A2)."""
    return (A1.unsqueeze(1) * A2.unsqueeze(0)).flatten(0, 1), (B1.unsqueeze(2) * B2.unsqueeze(1)).flatten(1, 2)


def factored_is_cheaper(d_in: int, d_out: int, k: int) -> bool:
    """Per token, x A⋆ᵀ B⋆ᵀ costs k·(d_in + d_out) MACs and x ΔWᵀ with ΔW built per call d_in·d_out."""
    return k * (d_in + d_out) <= d_in * d_out


def hadamard_macs(d_in: int, d_out: int, k: int) -> int:
    return k * (d_in + d_out) + k if factored_is_cheaper(d_in, d_out, k) else d_in * d_out


def add_hadamard(y, x, A1, B1, A2, B2, scale: float):
    """y + scale · x ((B1 A1) ⊙ (B2 A2))ᵀ, in whichever of the two forms costs fewer MACs per token."""
    d_out, d_in = B1.shape[0], A1.shape[1]
    if factored_is_cheaper(d_in, d_out, A1.shape[0] * A2.shape[0]):
        A_star, B_star = khatri_rao(A1, B1, A2, B2)
        return add_low_rank(y, F.linear(x, A_star) * scale, B_star)
    return y + F.linear(x, (B1 @ A1) * (B2 @ A2) * scale)


@register
class ABBA:
    name = "abba"
    config = ABBAConfig
    paper = ("Singhal+ 2025", "https://arxiv.org/abs/2505.14238")
    layer_kinds = ("linear",)
    params_per_layer = "(r + r2)·(d_in + d_out)"
    bench = {"r": 16, "alpha": 16.0, "lr": {"qwen": 1e-3, "stories": 3e-3, "tiny": 1e-2}}

    @staticmethod
    def check(d_in, d_out, cfg):
        check_svd_init(d_in, d_out, cfg)
        if cfg.r2 < 1:
            raise ConfigError(f"abba: r2={cfg.r2} must be >= 1 (the rank of the second pair)")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A1": ParamSpec((cfg.r, d_in)), "lora_B1": ParamSpec((d_out, cfg.r)),
                "lora_A2": ParamSpec((cfg.r2, d_in), "kaiming"), "lora_B2": ParamSpec((d_out, cfg.r2), "zeros")}

    @staticmethod
    @torch.no_grad()
    def init(a):
        cfg = a.cfg
        U, S, Vh = top_r_svd(dense_weight(a.base), cfg.r, cfg.svd, cfg.niter)
        root = S.sqrt()
        a.lora_B1.copy_(U * root)
        a.lora_A1.copy_(root[:, None] * Vh)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return hadamard_macs(d_in, d_out, cfg.r * cfg.r2)  # building A⋆, B⋆ or ΔW is per call

    @staticmethod
    def forward(a, x, y):
        return add_hadamard(y, x, a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2, a.cfg.alpha)

    @staticmethod
    def delta_weight(a):
        return a.cfg.alpha * (a.lora_B1.float() @ a.lora_A1.float()) * (a.lora_B2.float() @ a.lora_A2.float())

    @staticmethod
    def lora_factors(a):
        A_star, B_star = khatri_rao(*(t.float() for t in (a.lora_A1, a.lora_B1, a.lora_A2, a.lora_B2)))
        return A_star, B_star, a.cfg.alpha
