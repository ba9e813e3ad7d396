"""AntiPaSTO (rotation): wassname 2026, arXiv 2601.07473; lite port of github.com/wassname/antipasto3.

Rotate W's frozen top-r singular basis in small blocks and shift its singular values:
    W = U diag(S) Vh + W_res                 top-r SVD, U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    T: (n_blocks, b(b−1)/2) → skew A_n = ½(T_n − T_nᵀ) (b, b),  saturated A ← a·tanh(A/a), a = 2 tan(θmax/2)
    R_n = (I − A_n/2)⁻¹ (I + A_n/2)          Cayley: orthogonal, R = blockdiag(R_1 .. R_n)  (r, r)
    Vh_eff = R Vh   (rotate_basis V),  U_eff = U R_uᵀ  (U; "both" uses a second T_u)
    y' = x W_resᵀ + ((x Vh_effᵀ) ⊙ (S + δs)) U_effᵀ

R is applied block by block (a batched (b, b) @ (b, d) product), never as a dense r×r matrix.
Trainable: δs (r,) and T (and T_u), all zeros, so R = I and the output is the base's at init (up to one rounding
of W_res). Both still get a gradient at step 0: ∂y/∂δs = (x Vhᵀ) Uᵀ, and the Cayley map's derivative at 0 is
½(T − Tᵀ) ≠ 0. (antipasto3 starts δs at 4e-4 + N(0, 4e-4); that breaks identity, so it is not kept here.)
Needs a dense nn.Linear (W is rewritten through `base_delta`). Trainable params per layer:
r + (r/b)·b(b−1)/2 per rotated side (rotate_basis "none": r).
"""

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..svd import check_svd_init
from ..variant import ParamSpec, register
from . import _svd_basis as basis

_BASES = ("V", "U", "both", "none")


@dataclass
class AntiPaSTOConfig(basis.SVDBasisConfig):
    block_size: int = 4
    max_rotation_angle: float = 0.5
    rotate_basis: str = "V"


def block_rotations(T: torch.Tensor, block_size: int, max_angle: float) -> torch.Tensor:
    """(n_blocks, b(b−1)/2) -> (n_blocks, b, b) orthogonal Cayley blocks, built in fp32."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=T.device)
    A = T.new_zeros(T.shape[0], block_size, block_size, dtype=torch.float32)
    A[:, rows, cols] = T.float()
    A = 0.5 * (A - A.transpose(-1, -2))
    limit = 2.0 * math.tan(max_angle / 2.0)
    A = limit * torch.tanh(A / limit)
    eye = torch.eye(block_size, device=T.device).expand_as(A)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def rotated_basis(a) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_eff, Vh_eff) in the adapter dtype."""
    cfg, U, Vh = a.cfg, a.lora_U, a.lora_Vh
    b, angle = cfg.block_size, cfg.max_rotation_angle
    if cfg.rotate_basis in ("V", "both"):
        R = block_rotations(a.lora_rot_T, b, angle).to(Vh.dtype)
        Vh = (R @ Vh.reshape(-1, b, Vh.shape[1])).reshape(Vh.shape)  # R_n Vh_n per block
    if cfg.rotate_basis in ("U", "both"):
        T_u = a.lora_rot_T_u if cfg.rotate_basis == "both" else a.lora_rot_T
        R_u = block_rotations(T_u, b, angle).to(U.dtype)
        U = torch.einsum("dnb,ncb->dnc", U.reshape(U.shape[0], -1, b), R_u).reshape(U.shape)  # U_n R_nᵀ
    return U, Vh


@register
class AntiPaSTO:
    name = "antipasto"
    config = AntiPaSTOConfig
    paper = basis.PAPER
    params_per_layer = "r + (r/b)·b(b−1)/2 per rotated side"
    bench = basis.BENCH
    needs_dense_weight = True

    init = staticmethod(basis.init_basis)
    base_delta = staticmethod(basis.basis_delta)
    added_macs = staticmethod(basis.basis_macs)

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.rotate_basis not in _BASES:
            raise ConfigError(f"antipasto: rotate_basis={cfg.rotate_basis!r} is not one of {_BASES}")
        if not isinstance(cfg.block_size, int) or cfg.block_size < 2 or cfg.r % cfg.block_size:
            raise ConfigError(f"antipasto: block_size={cfg.block_size!r} must be an int >= 2 that divides r={cfg.r}; "
                              "pick r as a multiple of block_size")
        if not 0 < cfg.max_rotation_angle < math.pi:
            raise ConfigError(f"antipasto: max_rotation_angle={cfg.max_rotation_angle} must lie in (0, pi)")
        check_svd_init(d_in, d_out, cfg)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        specs = {**basis.basis_specs(d_in, d_out, cfg.r),
                 "lora_delta_s": ParamSpec((cfg.r,), "zeros")}
        n_blocks, n_angles = cfg.r // cfg.block_size, cfg.block_size * (cfg.block_size - 1) // 2
        if cfg.rotate_basis != "none":
            specs["lora_rot_T"] = ParamSpec((n_blocks, n_angles), "zeros")
        if cfg.rotate_basis == "both":
            specs["lora_rot_T_u"] = ParamSpec((n_blocks, n_angles), "zeros")
        return specs

    @staticmethod
    def forward(a, x, y):
        U, Vh = rotated_basis(a)
        h = (x @ Vh.T) * (a.lora_S + a.lora_delta_s)
        return y + h @ U.T

    @staticmethod
    def delta_weight(a):
        U, Vh = rotated_basis(a)
        return (U.float() * (a.lora_S + a.lora_delta_s).float()) @ Vh.float()

    @staticmethod
    def lora_factors(a):
        """U R_uᵀ diag(S + δs) R_v Vh − U diag(S) Vh: the rotations stay inside the basis, so the change is
        U M Vh with the (r, r) M = R_uᵀ diag(S + δs) R_v − diag(S), rank r."""
        cfg, S = a.cfg, a.lora_S.float()
        eye = torch.eye(cfg.r, device=S.device)

        def dense(T):
            return torch.block_diag(*block_rotations(T, cfg.block_size, cfg.max_rotation_angle))
        R_v = dense(a.lora_rot_T) if cfg.rotate_basis in ("V", "both") else eye
        T_u = a.lora_rot_T_u if cfg.rotate_basis == "both" else getattr(a, "lora_rot_T", None)
        R_u = dense(T_u) if cfg.rotate_basis in ("U", "both") else eye
        M = R_u.T @ (S + a.lora_delta_s.float()).diag() @ R_v - S.diag()
        return basis.core_lora_factors(a, M)
