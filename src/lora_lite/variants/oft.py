"""OFT: Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv 2306.07280, in
the input-side form of OFTv2 (Qiu et al. 2025, arXiv 2506.19847). Matches PEFT's OFT (block_share, coft off).

The input is rotated block by block before W, so W is multiplied by a block-diagonal orthogonal matrix:
    x cut into n = d_in/b blocks of b;   x'_n = x_n R_n;   y' = W x' + bias      (W' = W Rᵀ, R = blockdiag(R_n))
    Q_n = M_n − M_nᵀ  skew, from the upper-triangle vector q_n;  q: (n, b(b−1)/2) zeros, trainable
    R_n = Cayley(Q_n) = (I − Q_n)(I + Q_n)⁻¹, or PEFT's default truncated Neumann series (cayley_neumann=True,
          5 terms): R = I + 2Q + 2Q² + 2Q³ + Q⁴ (PEFT's terms; orthogonal only up to O(Q⁴))
R is built per call in fp32 at least (n·b³) and applied as a batched (b, b) product, b·d_in MACs per
token. q = 0 gives R = I exactly, so identity at init is exact, and q has a gradient at step 0 (dR/dQ = 2 at 0).
Merge: W' = W Rᵀ (bias unchanged). R − I is full rank in general: no LoRA export.
Hook-only (a pre-hook on the input): works on quantized layers. Trainable params per layer: d_in·(b − 1)/2.
"""

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register


@dataclass
class OFTConfig(AdapterConfig):
    block_size: int = 32
    cayley_neumann: bool = True
    neumann_terms: int = 5


def rotations(q: torch.Tensor, cfg) -> torch.Tensor:
    """(n, b(b−1)/2) -> (n, b, b): PEFT's Cayley map of each block's skew matrix."""
    b = cfg.block_size
    q = q.to(torch.promote_types(q.dtype, torch.float32))  # no 16-bit LU on CPU; and R closer to orthogonal
    rows, cols = torch.triu_indices(b, b, offset=1, device=q.device)
    M = q.new_zeros(q.shape[0], b, b)
    M[:, rows, cols] = q
    Q = M - M.transpose(-1, -2)
    eye = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(Q)
    if not cfg.cayley_neumann:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    # PEFT's series for t terms: I + 2Q, then (t > 2) + 2Q² + ... + 2Q^(t−2) + Q^(t−1); t = 3 gives up to Q³ too
    R = eye + 2 * Q
    if cfg.neumann_terms > 2:
        power = Q @ Q
        R = R + 2 * power
        for _ in range(3, cfg.neumann_terms - 1):
            power = power @ Q
            R = R + 2 * power
        R = R + power @ Q
    return R


@register
class OFT:
    name = "oft"
    config = OFTConfig
    paper = ("Qiu+ 2023", "https://arxiv.org/abs/2306.07280")
    layer_kinds = ("linear",)
    params_per_layer = "d_in·(b − 1)/2"
    # stories260K's down_proj takes 172 = 4·43 inputs: 43-wide blocks
    bench = {"lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 3e-3}, "knobs": {"block_size": 32},
             "preset_knobs": {"stories": {"block_size": 43}}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.OFTConfig(r=0, oft_block_size=cfg.block_size, use_cayley_neumann=cfg.cayley_neumann,
                               num_cayley_neumann_terms=cfg.neumann_terms, target_modules=list(targets)), "OFTConfig")

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.block_size < 2 or d_in % cfg.block_size:
            raise ConfigError(f"oft: block_size={cfg.block_size} must be >= 2 and divide the layer's d_in={d_in} "
                              "(divisible); pick a divisor of every target's input size")
        if cfg.cayley_neumann and cfg.neumann_terms < 2:
            raise ConfigError(f"oft: neumann_terms={cfg.neumann_terms} must be >= 2; with one term R = I and nothing "
                              "trains")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        b = cfg.block_size
        return {"lora_q": ParamSpec((d_in // b, b * (b - 1) // 2), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.block_size * d_in  # x_n R_n per block (building R is per call)

    @staticmethod
    def forward_input(a, x):
        R = rotations(a.master.lora_q, a.cfg).to(x.dtype)
        return torch.einsum("...nk,nkc->...nc", x.unflatten(-1, (R.shape[0], -1)), R).flatten(-2)

    @staticmethod
    def merged_weight(a, W, bias):
        R = rotations(a.lora_q, a.cfg)
        return torch.einsum("onc,nkc->onk", W.unflatten(-1, (R.shape[0], -1)), R).flatten(-2), bias
