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
Reads the dense weight in forward, so it needs a plain float nn.Linear. Merge: W' = (m / ‖W + sBA‖) ⊙ (W + sBA).
No plain-LoRA export: the row rescaling makes ΔW full rank (PEFT keeps it as use_dora, which vLLM refuses).
Trainable params per layer: r·(d_in + d_out) + d_out.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..variant import ParamSpec, check_rank, register
from .lora import LoRA


@dataclass
class DoRAConfig(AdapterConfig):
    variant = "dora"


def row_norm(layer) -> torch.Tensor:
    """‖W + s·B A‖ per output row, in fp32, without building B A."""
    W, A, B, s = layer.weight, layer.lora_A.float(), layer.lora_B.float(), layer._lora_cfg.scale
    w_sq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square()
    WA = F.linear(W, layer.lora_A.to(W.dtype)).float()  # (d_out, r)
    cross = (B * WA).sum(1)
    ba_sq = ((B @ (A @ A.T)) * B).sum(1)
    return (w_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt().clamp_min(1e-12)


@register
class DoRA:
    name = "dora"
    config = DoRAConfig
    needs_dense_weight = True

    check = staticmethod(check_rank)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros"),
                "lora_m": ParamSpec((d_out,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return LoRA.added_macs(d_in, d_out, cfg) + 2 * d_out  # LoRA path, (m/n − 1)·Wx, (m/n)·LoRA; norm per call

    @staticmethod
    @torch.no_grad()
    def init(layer, cfg):
        layer.lora_m.copy_(torch.linalg.vector_norm(layer.weight, dim=1, dtype=torch.float32))

    @staticmethod
    def forward(layer, x, y):
        with torch.no_grad():  # in m's dtype, so m / n is exactly 1 at init even in bf16
            norm = row_norm(layer).to(layer.lora_m.dtype)
        magnitude = layer.lora_m / norm
        wx = y if layer.bias is None else y - layer.bias
        # y + [(m/n − 1) ⊙ Wx + (m/n) ⊙ s·BAx]: the untouched y (bias included) is never re-rounded
        lora = F.linear(F.linear(x, layer.lora_A) * layer._lora_cfg.scale, layer.lora_B)
        out = (magnitude - 1) * wx
        out += magnitude * lora  # in place: the same roundings as y + (a + b), two (..., d_out) buffers fewer
        return out.add_(y)

    @staticmethod
    def delta_weight(layer):
        W = layer.weight.float()
        V = W + LoRA.delta_weight(layer)
        return (layer.lora_m.float() / row_norm(layer))[:, None] * V - W
