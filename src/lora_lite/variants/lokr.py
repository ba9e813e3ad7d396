"""LoKr: Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", arXiv 2309.14859. Matches PEFT's LoKr (linear layers, decompose_both=False).

The update is a Kronecker product of a small full matrix and a (low-rank) larger one:
    d_out = a·b, d_in = c·e           PEFT's factorization(dim, decompose_factor), a ≤ b and c ≤ e by default
    ΔW = s · W1 ⊗ W2,   s = alpha / r (alpha / √r with use_rslora),   W1: (a, c) zeros, trainable
    W2: (b, e) kaiming when r ≥ max(b, e)/2, else W2 = W2a W2b with W2a (b, r), W2b (r, e) kaiming (PEFT's rule)
Applied without building ΔW: with x cut into a (c, e) matrix X (row-major), ΔW x = vec(W1 X W2ᵀ), so a token
costs c·e·b + a·c·b MACs (full W2) instead of PEFT's d_in·d_out after a per-call kron.
Identity at init is exact because W1 = 0; W1 trains from step 0, W2 from step 1.
rank(ΔW) = rank(W1)·rank(W2), up to c·r: not exported as a LoRA. Merge: W' = W + s·W1 ⊗ W2.
Hook-only: works on quantized layers. Trainable params per layer: a·c + b·e (full W2) or a·c + r·(b + e).
"""

from dataclasses import dataclass

import torch

from ..config import LowRankConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register
from .loha import lycoris_alpha


@dataclass
class LoKrConfig(LowRankConfig):
    alpha: float = 8.0
    decompose_factor: int = -1


def factorization(dim: int, factor: int) -> tuple[int, int]:
    """(m, n) with m·n = dim, PEFT's rule: (factor, dim/factor) if factor divides dim, else m ≤ n the divisor
    nearest √dim that is at most factor (-1: no limit)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, int(dim ** 0.5) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def shapes(d_in: int, d_out: int, cfg) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """((a, c), (b, e), W2 is full)."""
    (a, b), (c, e) = factorization(d_out, cfg.decompose_factor), factorization(d_in, cfg.decompose_factor)
    return (a, c), (b, e), not cfg.r < max(b, e) / 2


def second_factor(a) -> torch.Tensor:
    return a.lora_w2 if hasattr(a, "lora_w2") else a.lora_w2_a @ a.lora_w2_b


@register
class LoKr:
    name = "lokr"
    config = LoKrConfig
    paper = ("Yeh+ 2024", "https://arxiv.org/abs/2309.14859")
    layer_kinds = ("linear",)
    params_per_layer = "a·c + b·e, or a·c + r·(b + e) when W2 is low-rank (d_out = a·b, d_in = c·e)"
    bench = {"r": 8, "alpha": 8.0, "lr": {"qwen": 3e-3, "stories": 1e-2, "tiny": 3e-2}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.LoKrConfig(r=cfg.r, alpha=lycoris_alpha(cfg), decompose_factor=cfg.decompose_factor,
                                target_modules=list(targets)), "LoKrConfig")

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.decompose_factor == 0 or cfg.decompose_factor < -1:
            raise ConfigError(f"lokr: decompose_factor={cfg.decompose_factor} must be -1 (near √dim) or positive")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        w1, (b, e), full = shapes(d_in, d_out, cfg)
        specs = {"lora_w1": ParamSpec(w1, "zeros")}
        if full:
            return specs | {"lora_w2": ParamSpec((b, e), "kaiming")}
        return specs | {"lora_w2_a": ParamSpec((b, cfg.r), "kaiming"), "lora_w2_b": ParamSpec((cfg.r, e), "kaiming")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        (a, c), (b, e), full = shapes(d_in, d_out, cfg)
        w2 = c * e * b if full else c * e * cfg.r + c * cfg.r * b  # X W2ᵀ
        return w2 + a * c * b + d_out  # W1 ·, · s

    @staticmethod
    def forward(a, x, y):
        W1 = a.lora_w1
        X = x.unflatten(-1, (W1.shape[1], -1))  # (..., c, e)
        if hasattr(a, "lora_w2"):
            Z = X @ a.lora_w2.T
        else:
            Z = (X @ a.lora_w2_b.T) @ a.lora_w2_a.T  # (..., c, b), through the rank-r middle
        return y + (W1 @ Z).flatten(-2) * a.cfg.scale

    @staticmethod
    def delta_weight(a):
        return a.cfg.scale * torch.kron(a.lora_w1.float(), second_factor(a).float())
