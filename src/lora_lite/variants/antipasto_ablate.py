"""AntiPaSTO (ablate): trainable directional ablation (Arditi et al. 2024, arXiv 2406.11717) inside the
AntiPaSTO singular basis (wassname 2026, arXiv 2601.07473).

Project k learned directions out of the S-scaled output coordinates of W's top-r basis:
    W = U diag(S) Vh + W_res                 top-r SVD, U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    Ĉ = orthonormal columns of c (r, k)      k = 1: c/‖c‖;  k > 1: fp32 QR (no bf16 geqrf kernel)
    h = (x Vhᵀ) ⊙ S                          (..., r)
    h ← h − coeff · ((h Ĉ) ⊙ α) Ĉᵀ,   α = sigmoid(a) ∈ (0, 1)
    y' = x W_resᵀ + h Uᵀ

For coeff in [0, 1] the core I − coeff·Ĉ diag(α) Ĉᵀ is a contraction (eigenvalues in [0, 1]): it can damp
a direction, never amplify one. coeff < 0 adds the direction back. Meant for residual writers (o_proj,
down_proj). Trainable: c (r, k) ~ N(0, 1/√r) and the strength logits a (k,) = logit(init_alpha).
The prototype clamped a raw α to [0, 1]: one optimizer step below 0 zeroed the gradient of α and c for good
(the invariant matrix caught it at lr 0.3), so α is a sigmoid here, which keeps (0, 1) and never goes flat.
Identity at init is approximate on purpose: α = init_alpha > 0 (0.05) so c has a gradient at step 0; the
output moves by at most init_alpha·coeff of the top-r path.
Needs a dense nn.Linear (W is rewritten through `base_delta`). Trainable params per layer: r·k + k.
"""

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..svd import check_svd_init
from ..variant import ParamSpec, register
from . import _svd_basis as basis


@dataclass
class AntiPaSTOAblateConfig(basis.SVDBasisConfig):
    variant = "antipasto_ablate"
    k: int = 1
    init_alpha: float = 0.05
    coeff: float = 1.0


def directions(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Ĉ (r, k) with orthonormal columns and the strengths sigmoid(a) (k,)."""
    c = layer.lora_c
    if c.shape[1] == 1:
        c_hat = c / (c.norm(dim=0, keepdim=True) + 1e-6)
    else:
        c_hat = torch.linalg.qr(c.float())[0].to(c.dtype)
    return c_hat, layer.lora_alpha.sigmoid()


def core(layer) -> torch.Tensor:
    """(r, r) symmetric I − coeff·Ĉ diag(sigmoid(a)) Ĉᵀ acting on the S-scaled coordinates."""
    c_hat, alpha = directions(layer)
    eye = torch.eye(c_hat.shape[0], dtype=c_hat.dtype, device=c_hat.device)
    return eye - layer._lora_cfg.coeff * (c_hat * alpha) @ c_hat.T


@register
class AntiPaSTOAblate:
    name = "antipasto_ablate"
    config = AntiPaSTOAblateConfig
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
        if not 0 < cfg.init_alpha < 1:
            raise ConfigError(f"antipasto_ablate: init_alpha={cfg.init_alpha!r} must lie in (0, 1) (it is a sigmoid)")
        check_svd_init(d_in, d_out, cfg)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**basis.basis_specs(d_in, d_out, cfg.r),
                "lora_c": ParamSpec((cfg.r, cfg.k), lambda t: t.normal_(0, cfg.r ** -0.5)),
                "lora_alpha": ParamSpec((cfg.k,), lambda t: t.fill_(math.log(cfg.init_alpha / (1 - cfg.init_alpha))))}

    @staticmethod
    def forward(layer, x, y):
        # The r×r core is built once per call; the per-token work stays (..., d_in) -> (..., r) -> (..., d_out).
        h = (x @ layer.lora_Vh.T) * layer.lora_S
        return y + (h @ core(layer)) @ layer.lora_U.T

    @staticmethod
    def delta_weight(layer):
        M = core(layer).float()
        return (layer.lora_U.float() @ M * layer.lora_S.float()) @ layer.lora_Vh.float()

    @staticmethod
    def lora_factors(layer):
        """U (M − I) diag(S) Vh = −coeff·(U Ĉ diag σ(a))(Ĉᵀ diag(S) Vh): rank k against the original W."""
        c_hat, alpha = (t.float() for t in directions(layer))
        B = -layer._lora_cfg.coeff * (layer.lora_U.float() @ c_hat) * alpha
        return (c_hat.T * layer.lora_S.float()) @ layer.lora_Vh.float(), B, 1.0
