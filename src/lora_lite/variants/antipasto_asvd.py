"""AntiPaSTO (ASVD): the gain adapter on an activation-scaled basis. ASVD: Yuan et al. 2023, arXiv 2312.05821;
AntiPaSTO: wassname 2026, arXiv 2601.07473.

`antipasto_corda` with a diagonal instead of a full covariance (cheaper: no eigh, (d_in,) statistics):
    c = max(diag E[x xᵀ], 0) + cov_eps  (d_in,) over non-padding calibration tokens
    U S Vtᵀ = top-r SVD(W diag(√c));   P = Vt diag(1/√c)  (r, d_in)
    W = U diag(S) P + W_res;   y' = x W_resᵀ + ((x Pᵀ) ⊙ S ⊙ (1 + ELU(coeff·g))) Uᵀ
Columns of W that see large inputs weigh more in the SVD, so the kept r directions follow the data.
Everything else (requires calibration_data, zero basis during calibration, saved U/S/P buffers, identity at
init, g the only trainable) is as in antipasto_corda. Needs a dense nn.Linear. Trainable params per layer: r.
"""

from dataclasses import dataclass

import torch

from ..variant import register
from . import _svd_basis as basis
from .antipasto_corda import AntiPaSTOCorDA, orient


@dataclass
class AntiPaSTOASVDConfig(basis.GainConfig):
    cov_eps: float = 1e-3


def diagonal_roots(second_moment: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = second_moment.clamp_min(0) + eps
    return c.sqrt(), c.rsqrt()


@register
class AntiPaSTOASVD(AntiPaSTOCorDA):
    name = "antipasto_asvd"
    config = AntiPaSTOASVDConfig
    paper = ("Yuan+ 2023", "https://arxiv.org/abs/2312.05821")

    @staticmethod
    def group_init(model, adapters, cfg, calibration_data):
        orient(model, adapters, cfg, calibration_data, diagonal_roots, diagonal=True)
