"""LoRA-XS: Bałazy et al. 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
arXiv 2405.17604.

Train only an r×r matrix between frozen singular factors of W:
    W ≈ U_r diag(S_r) Vh_r               top-r SVD of W (svd / niter choose the method)
    A = diag(S_r) Vh_r  (r, d_in)        B = U_r  (d_out, r)       both frozen buffers, saved
    y' = y + s · ((x Aᵀ) Rᵀ) Bᵀ,  s = alpha / r,  R: (r, r) ~ N(0, 1e-5), trainable
The singular values are folded into A as in the reference code, so A's rows are not unit norm. alpha
defaults to r (s = 1), the paper's setting. W is left intact (no residual is written).
R is stored as used here (x Aᵀ Rᵀ); the paper's R is its transpose.
Identity at init is approximate: R ~ N(0, 1e-5) moves the output by about 1e-5·‖A‖·‖B‖.
Reads W once at init, so it needs a dense nn.Linear. Trainable params per layer: r².
Exports as a plain rank-r LoRA (A' = R A, B' = B); W is intact, so that is exact.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..svd import SVDInitConfig, check_svd_init, top_r_svd
from ..variant import ParamSpec, register


@dataclass
class LoRAXSConfig(SVDInitConfig):
    """alpha=None means alpha = r (scale 1)."""

    variant = "lora_xs"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r)
        super().__post_init__()


@register
class LoRAXS:
    name = "lora_xs"
    config = LoRAXSConfig
    needs_dense_weight = True

    check = staticmethod(check_svd_init)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r * cfg.r + cfg.r + cfg.r * d_out  # x Aᵀ, · Rᵀ, · s, · Bᵀ

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "zeros", trainable=False, as_buffer=True),
                "lora_B": ParamSpec((d_out, cfg.r), "zeros", trainable=False, as_buffer=True),
                "lora_R": ParamSpec((cfg.r, cfg.r), lambda t: t.normal_(0, 1e-5))}

    @staticmethod
    @torch.no_grad()
    def init(layer, cfg):
        U, S, Vh = top_r_svd(layer.weight, cfg.r, cfg.svd, cfg.niter)
        layer.lora_A.copy_(S[:, None] * Vh)
        layer.lora_B.copy_(U)

    @staticmethod
    def forward(layer, x, y):
        h = F.linear(F.linear(x, layer.lora_A), layer.lora_R) * layer._lora_cfg.scale
        return y + F.linear(h, layer.lora_B)

    @staticmethod
    def delta_weight(layer):
        return layer._lora_cfg.scale * (layer.lora_B.float() @ layer.lora_R.float() @ layer.lora_A.float())

    @staticmethod
    def lora_factors(layer):
        return layer.lora_R.float() @ layer.lora_A.float(), layer.lora_B.float(), layer._lora_cfg.scale
