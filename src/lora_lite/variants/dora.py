"""DoRA: Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

Magnitude times direction, with LoRA supplying the direction update:
    V = W + s·B A                     (d_out, d_in), never materialised
    n = ‖V‖ per output row, detached  (paper §4.3: no gradient through the norm; PEFT does the same)
    y' = (m / n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias        the bias is NOT rescaled
    A: (r, d_in) kaiming   B: (d_out, r) zeros   m: (d_out,) = ‖W‖ per row at init; all trainable

The row norm is factored so no d_out×d_in temporary is built:
    ‖W + sBA‖²_i = ‖W_i‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B (A Aᵀ))_ik B_ik
costing r·d_in·d_out once per call instead of per token. Identity at init: B = 0 and m = ‖W‖, and the
output is formed as y + (m/n − 1)⊙Wx + (m/n)⊙s·BAx (as PEFT does) with n rounded to m's dtype, so it is
exact in bf16 too.
Reads the dense weight in forward, so it needs a plain float weight: nn.Linear, Conv1D or a conv, read as
(d_out, d_in) (`a.weight`; a conv's row norm is over C_in·∏kernel, as in PEFT). Any r works. Merge: W' = (m / ‖W + sBA‖) ⊙ (W + sBA).
No plain-LoRA export: the row rescaling makes ΔW full rank (PEFT keeps it as use_dora, which vLLM refuses).
Trainable params per layer: r·(d_in + d_out) + d_out.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LowRankConfig
from ..variant import ParamSpec, register
from .lora import LoRA, peft_lora


@dataclass
class DoRAConfig(LowRankConfig):
    pass


def row_norm(a) -> torch.Tensor:
    """‖W + s·B A‖ per output row, in fp32, without building B A."""
    W, A, B, s = a.weight, a.lora_A.float(), a.lora_B.float(), a.cfg.scale
    w_sq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square()
    WA = F.linear(W, a.lora_A.to(W.dtype)).float()  # (d_out, r)
    cross = (B * WA).sum(1)
    ba_sq = ((B @ (A @ A.T)) * B).sum(1)
    return (w_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt().clamp_min(1e-12)


@register
class DoRA:
    name = "dora"
    config = DoRAConfig
    paper = ("Liu+ 2024", "https://arxiv.org/abs/2402.09353")
    params_per_layer = "r·(d_in + d_out) + d_out"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}
    needs_dense_weight = True
    layer_kinds = ("linear", "conv1d_gpt2", "conv")

    @staticmethod
    def peft(cfg, targets):
        return peft_lora(cfg, targets, use_dora=True), "LoraConfig(use_dora=True)"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros"),
                "lora_m": ParamSpec((d_out,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return LoRA.added_macs(d_in, d_out, cfg) + 2 * d_out  # LoRA path, (m/n − 1)·Wx, (m/n)·LoRA; norm per call

    @staticmethod
    @torch.no_grad()
    def init(a):
        a.lora_m.copy_(torch.linalg.vector_norm(a.weight, dim=1, dtype=torch.float32))

    @staticmethod
    def forward(a, x, y):
        with torch.no_grad():  # rounded like the stored m, so m / n is exactly 1 at init in every dtype
            norm = row_norm(a.master).to(a.master.lora_m.dtype).to(a.lora_m.dtype)
        magnitude = a.lora_m / norm
        bias = a.base.bias
        wx = y if bias is None else y - bias
        # y + [(m/n − 1) ⊙ Wx + (m/n) ⊙ s·BAx]: the untouched y (bias included) is never re-rounded
        lora = F.linear(a.project(x, a.lora_A) * a.cfg.scale, a.lora_B)
        out = (magnitude - 1) * wx
        out += magnitude * lora  # in place: the same roundings as y + (a + b), two (..., d_out) buffers fewer
        return out.add_(y)

    @staticmethod
    def delta_weight(a):
        W = a.weight.float()
        V = W + LoRA.delta_weight(a)
        return (a.lora_m.float() / row_norm(a))[:, None] * V - W
