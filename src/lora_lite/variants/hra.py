"""HRA: Yuan et al. 2024, "Bridging the Gap Between Low-Rank and Orthogonal Adaptation via Householder
Reflection Adaptation", arXiv 2405.17484.

W is multiplied on the input side by an orthogonal R, a chain of r Householder reflections:
    H_i = I − 2 ū_i ū_iᵀ  (ū_i = u_i / ‖u_i‖),   R = H_0 H_1 … H_{r−1},   y' = x (W R)ᵀ = (x Rᵀ) Wᵀ
    U: (r, d_in) trainable, one reflection vector per row          (PEFT stores Uᵀ as hra_u)

R is applied to x in a pre-hook, in compact WY form rather than r sequential rank-1 updates:
    R = I − Uᵀ T U,   T = (½ diag(U Uᵀ) + striu(U Uᵀ))⁻¹  upper-triangular (r, r)
    x Rᵀ = x − ((x Uᵀ) Tᵀ) U                 two skinny matmuls + one r×r triangular solve per call.
Init is PEFT's symmetric one: adjacent rows are equal, so H_{2k} H_{2k+1} = I and R = I exactly, while U
still gets a gradient at step 0. That needs an even r. Matches PEFT's reflection order (x Rᵀ, not x R).
No Gram-Schmidt option; the paper's orthogonality regulariser is a loss term left to the user.
Hook-only: works on quantized layers. Trainable params per layer: r·d_in.
Merge: W' = W R. Export: W R − W = −W Uᵀ T U has rank ≤ r, an exact rank-r LoRA (A = U, B = −W Uᵀ T).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RankConfig
from ..errors import ConfigError
from ..quant import dense_weight
from ..variant import ParamSpec, autocast_off, check_rank, register


@dataclass
class HRAConfig(RankConfig):
    pass


def _paired_kaiming(t: torch.Tensor) -> None:
    half = torch.empty(t.shape[0] // 2, t.shape[1], dtype=t.dtype, device=t.device)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    t.copy_(half.repeat_interleave(2, dim=0))


def wy_factors(a) -> tuple[torch.Tensor, torch.Tensor]:
    """U (r, d_in) as stored, and Tᵀ (r, r), such that R = I − Uᵀ T U.

    T⁻¹ = striu(U Uᵀ) + ½ diag(U Uᵀ) holds for rows of any length, so U is never normalised: with the paired
    init, T's two columns for a pair are exact opposites and the correction cancels exactly, even in bf16.
    """
    U = a.lora_U
    with autocast_off(U.device):  # autocast would form G in bf16, which the triangular solve does not take
        G = U.float() @ U.float().T
        eye = torch.eye(U.shape[0], dtype=torch.float32, device=U.device)
        S = torch.triu(G, diagonal=1) + torch.diag(0.5 * G.diagonal().clamp_min(1e-12))
        T = torch.linalg.solve_triangular(S, eye, upper=True)
    return U, T.T.to(U.dtype)


@register
class HRA:
    name = "hra"
    config = HRAConfig
    paper = ("Yuan+ 2024", "https://arxiv.org/abs/2405.17484")
    params_per_layer = "r·d_in (r even)"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.HRAConfig(r=cfg.r, target_modules=list(targets)), "HRAConfig"

    @staticmethod
    def check(d_in, d_out, cfg):
        check_rank(d_in, d_in, cfg)
        if cfg.r % 2:
            raise ConfigError(f"hra: r={cfg.r} is odd; the identity init pairs reflections, so use an even r")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_U": ParamSpec((cfg.r, d_in), _paired_kaiming)}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return 2 * cfg.r * d_in + cfg.r * cfg.r  # x Yᵀ, · Tᵀ, · Y  (building Y and T is per call)

    @staticmethod
    def call_macs(d_in, d_out, cfg):
        # U Uᵀ and the r×r triangular solve for T, with their backward (three times the forward)
        return 3 * (cfg.r * cfg.r * d_in + cfg.r**3 // 2)

    @staticmethod
    def forward_input(a, x):
        U, Tt = wy_factors(a)
        return x - F.linear(F.linear(x, U) @ Tt, U.T)

    @staticmethod
    def rotation(a) -> torch.Tensor:
        """The explicit (d_in, d_in) R, for merging and tests."""
        U, Tt = wy_factors(a)
        U, T = U.float(), Tt.float().T
        return torch.eye(U.shape[1], device=U.device) - U.T @ T @ U

    @staticmethod
    def merged_weight(a, W, bias):
        U, Tt = wy_factors(a)
        U, T = U.float(), Tt.float().T
        return W - ((W @ U.T) @ T) @ U, bias  # W R in O(d_out·d_in·r), never building R

    @staticmethod
    def lora_factors(a):
        """W R − W = −W Uᵀ T U: rank ≤ r, so A = U and B = −W Uᵀ T, in closed form."""
        U, Tt = wy_factors(a)
        U, T = U.float(), Tt.float().T
        return U, -(dense_weight(a.base) @ U.T @ T), 1.0
