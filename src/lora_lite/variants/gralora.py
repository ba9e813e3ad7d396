"""GraLoRA: Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
arXiv 2505.20355. Matches PEFT's GraLoRA.

W is cut into k×k blocks and block (j, n) (output block j, input block n) gets its own rank-r/k pair, for the
same parameter count as a rank-r LoRA but a rank up to k·r:
    x_n = x[n-th of k input blocks]                          (..., d_in/k)
    h_n = x_n A_n                 A: (k, d_in/k, r)          h_n split into k chunks h_n^j of r/k
    y'_j = y_j + s · Σ_n h_n^j B_j^n                         B: (k, r, d_out/k), B_j^n its n-th r/k rows
    s = alpha / (r + hybrid_r);   hybrid_r > 0 adds a plain LoRA s·(x A_hᵀ) B_hᵀ beside the blocks
A kaiming and B zeros (each block like a LoRA), so identity at init is exact; B trains from step 0, A from 1.
The tensors keep PEFT's layouts. Needs r divisible by k and k dividing d_in and d_out.
Exactly low-rank: ΔW = s·B' A' with A' = blockdiag(A_nᵀ) (k·r, d_in) and B' (d_out, k·r) holding B_j^n at
(output block j, columns n·r + j·r/k ...), plus the hybrid pair: a plain LoRA of rank k·r + hybrid_r.
Hook-only: works on quantized layers. Trainable params per layer: (r + hybrid_r)·(d_in + d_out).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register


@dataclass
class GraLoRAConfig(RankConfig):
    r: int = 32
    alpha: float = 64.0
    k: int = 2
    hybrid_r: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


def _kaiming_blocks(t: torch.Tensor) -> None:
    """Each (d_in/k, r) block A_n initialised as PEFT does: kaiming on its (r, d_in/k) transpose."""
    for block in t:
        torch.nn.init.kaiming_uniform_(block.T, a=5 ** 0.5)


def granular(a, x: torch.Tensor) -> torch.Tensor:
    """Σ_n h_n^j B_j^n for every output block j: (..., d_in) -> (..., d_out), unscaled."""
    k, r = a.cfg.k, a.cfg.r
    h = torch.einsum("...ni,nir->...nr", x.unflatten(-1, (k, -1)), a.lora_A)  # (..., k_in, r)
    g = h.unflatten(-1, (k, r // k)).transpose(-3, -2).flatten(-2)  # (..., k_out, k_in·r/k): chunk j of every h_n
    return torch.einsum("...jr,jro->...jo", g, a.lora_B).flatten(-2)


@register
class GraLoRA:
    name = "gralora"
    config = GraLoRAConfig
    paper = ("Jung+ 2025", "https://arxiv.org/abs/2505.20355")
    layer_kinds = ("linear",)
    params_per_layer = "(r + hybrid_r)·(d_in + d_out)"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 2e-4, "stories": 3e-3, "tiny": 1e-2}, "knobs": {"k": 2}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.GraloraConfig(r=cfg.r, alpha=cfg.alpha, gralora_k=cfg.k, hybrid_r=cfg.hybrid_r,
                                   target_modules=list(targets)), "GraloraConfig")

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.k < 1 or cfg.r % cfg.k or d_in % cfg.k or d_out % cfg.k:
            raise ConfigError(f"gralora: k={cfg.k} must divide r={cfg.r} and the layer's d_in={d_in} and d_out={d_out} "
                              "(divisible); pick k dividing r and every target's sizes")
        if cfg.hybrid_r < 0:
            raise ConfigError(f"gralora: hybrid_r={cfg.hybrid_r} must be >= 0 (0: no plain LoRA beside the blocks)")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        k = cfg.k
        specs = {"lora_A": ParamSpec((k, d_in // k, cfg.r), _kaiming_blocks),
                 "lora_B": ParamSpec((k, cfg.r, d_out // k), "zeros")}
        if cfg.hybrid_r:
            specs |= {"lora_hybrid_A": ParamSpec((cfg.hybrid_r, d_in), "kaiming"),
                      "lora_hybrid_B": ParamSpec((d_out, cfg.hybrid_r), "zeros")}
        return specs

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        block_path = cfg.r * d_in + cfg.r * d_out  # each input block to r, each output block from r
        return block_path + cfg.hybrid_r * (d_in + d_out) + d_out  # hybrid LoRA, · s

    @staticmethod
    def forward(a, x, y):
        delta = granular(a, x)
        if a.cfg.hybrid_r:
            delta = delta + F.linear(F.linear(x, a.lora_hybrid_A), a.lora_hybrid_B)
        return y + a.cfg.scale * delta

    @staticmethod
    def lora_factors(a):
        k, r = a.cfg.k, a.cfg.r
        A, B = a.lora_A.float(), a.lora_B.float()
        A_full = torch.block_diag(*(A[n].T for n in range(k)))  # (k·r, d_in): row n·r + c reads input block n
        B_full = B.new_zeros(a.d_out, k * r)
        out = a.d_out // k
        for j in range(k):
            for n in range(k):  # output block j reads chunk j of h_n, whose rows in B_j are n·r/k ...
                chunk = slice(n * r // k, (n + 1) * r // k)
                B_full[j * out:(j + 1) * out, n * r + j * r // k:n * r + (j + 1) * r // k] = B[j, chunk].T
        if a.cfg.hybrid_r:
            A_full = torch.cat([A_full, a.lora_hybrid_A.float()])
            B_full = torch.cat([B_full, a.lora_hybrid_B.float()], dim=1)
        return A_full, B_full, a.cfg.scale

    @staticmethod
    def delta_weight(a):
        A, B, s = GraLoRA.lora_factors(a)
        return s * (B @ A)
