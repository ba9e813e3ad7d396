"""LoRA-XS: Bałazy et al. 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
arXiv 2405.17604.

Train only an r×r matrix between frozen singular factors of W:
    W ≈ U_r diag(S_r) Vh_r               top-r SVD of W (svd / niter choose the method)
    A = diag(S_r) Vh_r  (r, d_in)        B = U_r  (d_out, r)       both frozen buffers, saved
    y' = y + s · ((x Aᵀ) Rᵀ) Bᵀ,  s = alpha / r,  R: (r, r) zeros, trainable
The singular values are folded into A as in the reference code, so A's rows are not unit norm. alpha
defaults to r (s = 1), the paper's setting. W is left intact (no residual is written).
R is stored as used here (x Aᵀ Rᵀ); the paper's R is its transpose.
Identity at init is exact: R starts at zero (the paper draws it from N(0, 1e-5); R's gradient Bᵀ g (x Aᵀ)
does not depend on R, so zeros train the same and keep the base output exact).
Reads W once at init, so it needs a dense nn.Linear. Trainable params per layer: r².
Exports as a plain rank-r LoRA (A' = R A, B' = B); W is intact, so that is exact.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LowRankConfig
from ..svd import SVDInitConfig, check_svd_init, top_r_svd
from ..variant import ParamSpec, register


@dataclass
class LoRAXSConfig(SVDInitConfig, LowRankConfig):
    """alpha=None means alpha = r (scale 1)."""

    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r)
        super().__post_init__()


@register
class LoRAXS:
    name = "lora_xs"
    config = LoRAXSConfig
    paper = ("Bałazy+ 2024", "https://arxiv.org/abs/2405.17604")
    params_per_layer = "r²"
    bench = {"r": 32, "alpha": "r", "lr": {"qwen": 4e-3, "stories": 1e-2, "tiny": 3e-2}}
    needs_dense_weight = True

    check = staticmethod(check_svd_init)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r * cfg.r + cfg.r + cfg.r * d_out  # x Aᵀ, · Rᵀ, · s, · Bᵀ

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "zeros", trainable=False, as_buffer=True),
                "lora_B": ParamSpec((d_out, cfg.r), "zeros", trainable=False, as_buffer=True),
                "lora_R": ParamSpec((cfg.r, cfg.r), "zeros")}

    @staticmethod
    @torch.no_grad()
    def init(a):
        cfg = a.cfg
        U, S, Vh = top_r_svd(a.base.weight, cfg.r, cfg.svd, cfg.niter)
        a.lora_A.copy_(S[:, None] * Vh)
        a.lora_B.copy_(U)

    @staticmethod
    def forward(a, x, y):
        h = F.linear(F.linear(x, a.lora_A), a.lora_R) * a.cfg.scale
        return y + F.linear(h, a.lora_B)

    @staticmethod
    def delta_weight(a):
        return a.cfg.scale * (a.lora_B.float() @ a.lora_R.float() @ a.lora_A.float())

    @staticmethod
    def lora_factors(a):
        return a.lora_R.float() @ a.lora_A.float(), a.lora_B.float(), a.cfg.scale
