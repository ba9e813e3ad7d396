"""AntiPaSTO (DPLR): a diagonal-plus-low-rank core in the AntiPaSTO singular basis (wassname 2026,
arXiv 2601.07473).

The gain of `antipasto_gain` plus a rank-k mixing of the singular coordinates:
    W = U diag(S) Vh + W_res                 top-r SVD, U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    p = x Vhᵀ                                (..., r), NOT S-scaled, so the mixing cannot amplify through S
    h = p ⊙ S_eff + coeff · (p Aᵀ) Bᵀ        S_eff = S ⊙ (1 + ELU(coeff·g))
    y' = x W_resᵀ + h Uᵀ                     i.e. the core is diag(S_eff) + coeff·B A  (r, r)
    g: (r,) zeros   A: (k, r) kaiming   B: (r, k) zeros   (k = core_rank), all trainable

Replaces the prototype's arrowhead core, whose dense block on S-scaled coordinates was amplified by the
largest singular values and destabilised training.
Identity at init: g = 0 and B = 0, so y' = y up to one rounding of W_res to W's dtype.
Needs a dense nn.Linear (W is rewritten through `base_delta`). Trainable params per layer: r + 2·r·k.
"""

from dataclasses import dataclass

import torch.nn.functional as F

from ..errors import ConfigError
from ..svd import check_svd_init
from ..variant import ParamSpec, register
from . import _svd_basis as basis


@dataclass
class AntiPaSTODPLRConfig(basis.GainConfig):
    core_rank: int = 8


@register
class AntiPaSTODPLR:
    name = "antipasto_dplr"
    config = AntiPaSTODPLRConfig
    paper = basis.PAPER
    params_per_layer = "r + 2·r·k"
    bench = basis.BENCH
    needs_dense_weight = True

    init = staticmethod(basis.init_basis)
    base_delta = staticmethod(basis.basis_delta)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return basis.basis_macs(d_in, d_out, cfg) + 2 * cfg.r * cfg.core_rank + cfg.r  # p Aᵀ Bᵀ, · coeff

    @staticmethod
    def check(d_in, d_out, cfg):
        if not isinstance(cfg.core_rank, int) or not 1 <= cfg.core_rank <= cfg.r:
            raise ConfigError(f"antipasto_dplr: core_rank={cfg.core_rank!r} must be an int in [1, r={cfg.r}]")
        check_svd_init(d_in, d_out, cfg)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r, k = cfg.r, cfg.core_rank
        return {**basis.basis_specs(d_in, d_out, r), "lora_g": ParamSpec((r,), "zeros"),
                "lora_A": ParamSpec((k, r), "kaiming"), "lora_B": ParamSpec((r, k), "zeros")}

    @staticmethod
    def forward(a, x, y):
        p = F.linear(x, a.lora_Vh)
        h = p * (a.lora_S * basis.gain(a))
        h = h + a.cfg.coeff * F.linear(F.linear(p, a.lora_A), a.lora_B)
        return y + F.linear(h, a.lora_U)

    @staticmethod
    def delta_weight(a):
        core = a.cfg.coeff * (a.lora_B.float() @ a.lora_A.float())
        core = core + (a.lora_S.float() * basis.gain(a).float()).diag()
        return a.lora_U.float() @ core @ a.lora_Vh.float()

    @staticmethod
    def lora_factors(a):
        change = a.cfg.coeff * (a.lora_B.float() @ a.lora_A.float())
        return basis.core_lora_factors(a, change + (a.lora_S.float() * basis.gain_excess(a).float()).diag())
