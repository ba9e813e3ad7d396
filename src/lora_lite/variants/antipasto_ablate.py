"""AntiPaSTO (ablate): trainable directional ablation (Arditi et al. 2024, arXiv 2406.11717) inside the
AntiPaSTO singular basis (wassname 2026, arXiv 2601.07473).

Project k learned directions out of the S-scaled output coordinates of W's top-r basis:
    W = U diag(S) Vh + W_res                 top-r SVD, U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    Ĉ = orthonormal columns of c (r, k)      k = 1: c/‖c‖;  k > 1: fp32 QR (no bf16 geqrf kernel)
    h = (x Vhᵀ) ⊙ S                          (..., r)
    h ← h − coeff · ((h Ĉ) ⊙ α) Ĉᵀ,   α = tanh(a) ∈ (−1, 1)
    y' = x W_resᵀ + h Uᵀ

The core I − coeff·Ĉ diag(α) Ĉᵀ has eigenvalue 1 − coeff·α_j along direction j and 1 elsewhere: for coeff in
[0, 1], α > 0 damps a direction (α = 1, coeff = 1 removes it), α < 0 amplifies it at most 2×. Meant for
residual writers (o_proj, down_proj). Trainable: c (r, k) ~ N(0, 1/√r) and the strengths a (k,) = 0.
Identity at init is exact (up to one rounding of W_res): a = 0 gives α = 0 and core = I. a gets a gradient at
step 0 (c is random), c from step 1 (once α ≠ 0). tanh is smooth with tanh'(0) = 1 and never flat near 0: the
prototype clamped α to [0, 1], and one step below 0 froze α and c for good; a sigmoid avoids that but can
never be 0, so it cannot start at identity.
Needs a dense nn.Linear (W is rewritten through `base_delta`). Trainable params per layer: r·k + k.
"""

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..svd import check_svd_init
from ..variant import ParamSpec, register
from . import _svd_basis as basis


@dataclass
class AntiPaSTOAblateConfig(basis.SVDBasisConfig):
    k: int = 1
    coeff: float = 1.0


def directions(a) -> tuple[torch.Tensor, torch.Tensor]:
    """Ĉ (r, k) with orthonormal columns and the strengths tanh(a) (k,)."""
    c = a.lora_c
    if c.shape[1] == 1:
        c_hat = c / (c.norm(dim=0, keepdim=True) + 1e-6)
    else:
        c_hat = torch.linalg.qr(c.float())[0].to(c.dtype)
    return c_hat, a.lora_alpha.tanh()


def core(a) -> torch.Tensor:
    """(r, r) symmetric I − coeff·Ĉ diag(tanh(a)) Ĉᵀ acting on the S-scaled coordinates."""
    c_hat, alpha = directions(a)
    eye = torch.eye(c_hat.shape[0], dtype=c_hat.dtype, device=c_hat.device)
    return eye - a.cfg.coeff * (c_hat * alpha) @ c_hat.T


@register
class AntiPaSTOAblate:
    name = "antipasto_ablate"
    config = AntiPaSTOAblateConfig
    paper = ("Arditi+ 2024", "https://arxiv.org/abs/2406.11717")
    params_per_layer = "r·k + k"
    bench = basis.BENCH
    needs_dense_weight = True

    init = staticmethod(basis.init_basis)
    base_delta = staticmethod(basis.basis_delta)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return basis.basis_macs(d_in, d_out, cfg) + cfg.r * cfg.r  # plus h · core (r, r)

    @staticmethod
    def check(d_in, d_out, cfg):
        if not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.r:
            raise ConfigError(f"antipasto_ablate: k={cfg.k!r} must be an int in [1, r={cfg.r}]")
        check_svd_init(d_in, d_out, cfg)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**basis.basis_specs(d_in, d_out, cfg.r),
                "lora_c": ParamSpec((cfg.r, cfg.k), lambda t: t.normal_(0, cfg.r ** -0.5)),
                "lora_alpha": ParamSpec((cfg.k,), "zeros")}

    @staticmethod
    def forward(a, x, y):
        # The r×r core is built once per call; the per-token work stays (..., d_in) -> (..., r) -> (..., d_out).
        h = (x @ a.lora_Vh.T) * a.lora_S
        return y + (h @ core(a)) @ a.lora_U.T

    @staticmethod
    def delta_weight(a):
        M = core(a).float()
        return (a.lora_U.float() @ M * a.lora_S.float()) @ a.lora_Vh.float()

    @staticmethod
    def lora_factors(a):
        """U (M − I) diag(S) Vh = −coeff·(U Ĉ diag tanh(a))(Ĉᵀ diag(S) Vh): rank k against the original W."""
        c_hat, alpha = (t.float() for t in directions(a))
        B = -a.cfg.coeff * (a.lora_U.float() @ c_hat) * alpha
        return (c_hat.T * a.lora_S.float()) @ a.lora_Vh.float(), B, 1.0
