"""BOFT: Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", arXiv 2311.06243.
Matches PEFT's BOFT (which, without its CUDA extension, runs one factor whatever boft_n_butterfly_factor says).

The input is rotated by a product of m butterfly factors, each a permuted block-diagonal orthogonal matrix, and
the output is rescaled:
    M_i = P_i blockdiag(R_i1 .. R_iD) P_iᵀ   (d_in, d_in), D = d_in/b blocks of b;  P_0 = I, P_i interleaves the
          halves of blocks 2^i apart (PEFT's block_butterfly_perm)
    R_ij = (I − S)(I + S)⁻¹,  S = ½(T_ij − T_ijᵀ)   exact Cayley, T: (m, D, b, b) zeros, trainable
    y' = s ⊙ (x R Wᵀ) + b,   R = M_(m−1) ⋯ M_0      s: (d_out,) ones, trainable          (PEFT's form)
computed as y' = y + (s − 1) ⊙ (y − b) + s ⊙ (x (R − I)) Wᵀ from the incoming y, so an adapter before it on the
layer is kept (and scaled), and T = 0, s = 1 give y' = y exactly: identity at init is exact in every dtype.
Each factor is applied as a gather, a batched (b, b) product and a gather (b·d_in MACs per token per factor),
never as PEFT's dense (d_in, d_in) matrix; x (R − I) then needs one more matmul with W, d_in·d_out per token
(W read every call, dequantized per call on 4/8-bit layers). T and s have a gradient at step 0.
Merge: W' = diag(s) (W + W₀ (Rᵀ − I)), b' = s ⊙ (b − b₀) + b₀ for the layer's own W₀, b₀ (alone: diag(s) W₀ Rᵀ
and b₀, as PEFT); no LoRA export.
The butterfly permutations depend only on the config: `group_setup` builds them on attach and on load.
Trainable params per layer: m·d_in·b + d_out (PEFT's layout keeps the full b×b of which the skew part acts).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register
from .hira import frozen_weight


@dataclass
class BOFTConfig(AdapterConfig):
    block_size: int = 4
    butterfly_factor: int = 1


def butterfly_perm(d_in: int, block_size: int, level: int) -> torch.Tensor:
    """P_level as indices (P[k, perm[k]] = 1): within chunks of block_size·2^level, the half-block pieces in
    even positions first, then the odd ones."""
    if level == 0:
        return torch.arange(d_in)
    chunk, half = block_size * 2 ** level, block_size // 2
    pieces = torch.cat([torch.arange(0, chunk // half, 2), torch.arange(1, chunk // half, 2)])
    within = (pieces[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, d_in, chunk)[:, None] + within).flatten()


def cayley(T: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> orthogonal (..., b, b), solved in fp32 at least (no 16-bit LU on CPU, and R stays orthogonal)."""
    T = T.to(torch.promote_types(T.dtype, torch.float32))
    S = 0.5 * (T - T.transpose(-1, -2))
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S, left=False)


def rotate(a, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x M_(m−1) ⋯ M_0, each x M_i as x[inverse perm] · blockdiag(R_i) then [perm]."""
    for i in reversed(range(R.shape[0])):
        perm = a.lora_perm[i]
        z = x[..., torch.argsort(perm)].unflatten(-1, (R.shape[1], -1))
        x = torch.einsum("...nk,nkc->...nc", z, R[i]).flatten(-2)[..., perm]
    return x


@register
class BOFT:
    name = "boft"
    config = BOFTConfig
    paper = ("Liu+ 2024", "https://arxiv.org/abs/2311.06243")
    layer_kinds = ("linear",)
    params_per_layer = "m·d_in·b + d_out (m = butterfly_factor)"
    # stories260K's down_proj takes 172 = 4·43 inputs: b·2^(m−1) = 4 with an even b
    bench = {"lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}, "knobs": {"block_size": 4, "butterfly_factor": 2},
             "preset_knobs": {"stories": {"block_size": 2}}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.BOFTConfig(boft_block_size=cfg.block_size, boft_n_butterfly_factor=cfg.butterfly_factor,
                                target_modules=list(targets)), "BOFTConfig")

    @staticmethod
    def check(d_in, d_out, cfg):
        b, m = cfg.block_size, cfg.butterfly_factor
        if m < 1 or b < 2 or (m > 1 and b % 2) or d_in % (b * 2 ** (m - 1)):
            raise ConfigError(f"boft: block_size={b}, butterfly_factor={m} need m >= 1, an even b >= 2 (any b >= 2 "
                              f"when m = 1) and b·2^(m−1) dividing the layer's d_in={d_in} (divisible); lower m or "
                              "pick b so that every target's input size is a multiple")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        b = cfg.block_size
        return {"lora_T": ParamSpec((cfg.butterfly_factor, d_in // b, b, b), "zeros"), "lora_s": ParamSpec((d_out,), "ones")}

    @staticmethod
    def group_setup(model, adapters, cfg, loaded):
        for a in adapters:
            perms = torch.stack([butterfly_perm(a.d_in, cfg.block_size, i) for i in range(cfg.butterfly_factor)])
            a.register_buffer("lora_perm", perms.to(a.lora_s.device), persistent=False)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.butterfly_factor * cfg.block_size * d_in + d_in * d_out + 3 * d_out  # rotations, (xR − x) Wᵀ, ⊙

    @staticmethod
    def forward(a, x, y):
        R = cayley(a.master.lora_T).to(x.dtype)  # a (b, b) solve per block, in fp32
        s, bias = a.lora_s, a.base.bias
        moved = F.linear(rotate(a, x, R) - x, frozen_weight(a.base, x.dtype))
        wx = y if bias is None else y - bias.to(y.dtype)
        return y + (s - 1) * wx + s * moved

    @staticmethod
    def merged_weight(a, W, bias):
        R = rotate(a, torch.eye(a.d_in, device=W.device), cayley(a.lora_T))  # rows of I: the dense R
        s, W0 = a.lora_s.float(), frozen_weight(a.base, torch.float32)
        merged = s[:, None] * (W + W0 @ (R.T - torch.eye(a.d_in, device=W.device)))
        if bias is None:
            return merged, None
        b0 = a.base.bias.float()
        return merged, s * (bias - b0) + b0
