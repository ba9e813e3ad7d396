"""HiRA: Huang et al. 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models",
ICLR 2025, openreview.net/forum?id=TwJrTz9cRS (no arXiv version). Matches PEFT's HiRA.

The update is the frozen weight modulated entry by entry by a low-rank matrix, so it can be of high rank:
    ΔW = W ⊙ (B A)                 (d_out, d_in);   y' = y + x ΔWᵀ
    A: (r, d_in) kaiming, trainable        B: (d_out, r) zeros, trainable        no scaling (as PEFT)
ΔW is built once per call (r·d_out·d_in MACs) and applied as one more dense matmul per token, as PEFT does;
its rank is not bounded by r (rank(W ⊙ BA) ≤ rank(W)·r), so there is no LoRA export.
Identity at init is exact: B = 0. B trains from step 0, A from step 1.
Reads W in every forward: a float weight directly, a bitsandbytes 4/8-bit one dequantized per call (frozen,
no gradient), so it works on quantized bases (merging those is refused by merge itself).
Merge: W' = W + W ⊙ (B A). Trainable params per layer: r·(d_in + d_out).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..quant import dense_weight, is_quantized
from ..variant import ParamSpec, check_rank, register


@dataclass
class HiRAConfig(RankConfig):
    r: int = 32


def frozen_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """W as the layer multiplies by it, in `dtype`, outside autograd (a dequantized copy for bitsandbytes)."""
    if is_quantized(layer):
        return dense_weight(layer, dtype)
    return layer.weight.detach().to(dtype)


@register
class HiRA:
    name = "hira"
    config = HiRAConfig
    paper = ("Huang+ 2025", "https://openreview.net/forum?id=TwJrTz9cRS")
    layer_kinds = ("linear",)
    params_per_layer = "r·(d_in + d_out)"
    bench = {"r": 32, "lr": {"qwen": 4.5e-3, "stories": 1e-2, "tiny": 3e-2}}

    check = staticmethod(check_rank)

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.HiraConfig(r=cfg.r, target_modules=list(targets)), "HiraConfig"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r), "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_in * d_out  # x (W ⊙ BA)ᵀ; building W ⊙ BA (r·d_out·d_in) is per call

    @staticmethod
    def forward(a, x, y):
        W = frozen_weight(a.base, y.dtype)
        return y + F.linear(x, W * (a.lora_B @ a.lora_A))

    @staticmethod
    def delta_weight(a):
        return frozen_weight(a.base, torch.float32) * (a.lora_B.float() @ a.lora_A.float())
