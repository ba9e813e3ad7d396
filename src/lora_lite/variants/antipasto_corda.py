"""AntiPaSTO (CorDA): the gain adapter on a context-oriented basis. CorDA: Yang et al. 2024, arXiv 2406.05223
(IPM mode: keep the top r); AntiPaSTO: wassname 2026, arXiv 2601.07473.

Orient W's SVD by the covariance of the layer's calibration inputs, so the kept r directions are the ones
that carry W's output on real data:
    C = E[x xᵀ] (d_in, d_in) over non-padding calibration tokens;  C = Q diag(λ) Qᵀ,  λ ← max(λ, 0) + cov_eps
    U S Vtᵀ = top-r SVD(W C^½);   P = Vt C^-½  (r, d_in), an oblique input projector
    W = U diag(S) P + W_res;   y' = x W_resᵀ + ((x Pᵀ) ⊙ S ⊙ (1 + ELU(coeff·g))) Uᵀ
The symmetric C^½ gives the same top-r U, S and P as PEFT's Cholesky form SVD(W L). U, S, P are frozen
`lora_*` buffers and are saved, so load() needs no data; W_res is built from the rounded buffers (identity
costs one rounding). Trainable: g (r,) zeros, so identity holds at init.

Requires calibration_data: attach() raises CalibrationError before touching the model without it, and a
layer that sees fewer than r tokens raises too. init() leaves U, S, P at zero (the adapter is then an exact
identity and W is untouched) so the calibration forwards see the base model's activations, then group_init
orients. Cost: one d_in×d_in covariance per target (on CPU) and an eigh, O(d_in³).
Needs a dense nn.Linear. Trainable params per layer: r.
"""

from dataclasses import dataclass

import torch

from ..calibration import input_moments
from ..svd import check_svd_init, top_r_svd
from ..variant import ParamSpec, register
from . import _svd_basis as basis


@dataclass
class AntiPaSTOCorDAConfig(basis.GainConfig):
    cov_eps: float = 1e-3


def covariance_roots(C: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C^½ and C^-½ (both (d_in, d_in)) of the regularised covariance."""
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0) + eps
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


@torch.no_grad()
def orient(model, adapters, cfg, data, roots, diagonal=False):
    """Shared by corda and asvd: roots(C, eps) gives (M, M⁻¹), (d_in, d_in) matrices or, when diagonal, (d_in,)."""
    moments = input_moments(model, [a.base for a in adapters], data, min_tokens=cfg.r, variant=cfg.variant, diagonal=diagonal)
    for a, C in zip(adapters, moments, strict=True):
        W = a.base.weight.float()  # still the original W: U, S, P are zero until this point
        half, inv_half = (m.to(W.device) for m in roots(C.to(W.device), cfg.cov_eps))
        U, S, Vt = top_r_svd(W @ half if half.ndim == 2 else W * half, cfg.r, cfg.svd, cfg.niter)
        a.lora_U.copy_(U)
        a.lora_S.copy_(S)
        a.lora_P.copy_(Vt @ inv_half if inv_half.ndim == 2 else Vt * inv_half)


@register
class AntiPaSTOCorDA:
    name = "antipasto_corda"
    config = AntiPaSTOCorDAConfig
    paper = ("Yang+ 2024", "https://arxiv.org/abs/2406.05223")
    params_per_layer = "r; needs calibration_data"
    bench = basis.BENCH
    needs_dense_weight = True
    requires_calibration = True

    check = staticmethod(check_svd_init)
    added_macs = staticmethod(basis.basis_macs)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**basis.basis_specs(d_in, d_out, cfg.r, "lora_P"), "lora_g": ParamSpec((cfg.r,), "zeros")}

    @staticmethod
    def group_init(model, adapters, cfg, calibration_data):
        # U, S, P start at zero: an exact identity (W untouched) while the calibration forwards run
        orient(model, adapters, cfg, calibration_data, covariance_roots)

    @staticmethod
    def base_delta(a):
        return basis.basis_delta(a, "lora_P")

    @staticmethod
    def forward(a, x, y):
        return basis.gain_forward(a, x, y, "lora_P")

    @staticmethod
    def delta_weight(a):
        return basis.gain_delta_weight(a, "lora_P")

    @staticmethod
    def lora_factors(a):
        return basis.gain_lora_factors(a, "lora_P")
