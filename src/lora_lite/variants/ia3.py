"""(IA)³: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638. Output-gate form, meant for k_proj / v_proj.

    y' = y ⊙ g          g: (d_out,) ones at init, trainable   (the bias is gated too, as in PEFT)

Identity is exact. Hook-only, so it works on quantized layers. Trainable params per layer: d_out.
Merge: W' = diag(g) W, b' = g ⊙ b. ΔW rescales every row, so it is full rank: no LoRA export.
bf16 note: the spacing of bf16 near 1.0 is 7.8e-3, so updates far below ~4e-3 round away; use lr ≳ 5e-3
or fp32 adapters. r and alpha are unused.
"""

from dataclasses import dataclass

from ..config import AdapterConfig
from ..variant import ParamSpec, register


@dataclass
class IA3Config(AdapterConfig):
    variant = "ia3"
    target_names: tuple[str, ...] | str = (r"(k_proj|v_proj)$",)


@register
class IA3:
    name = "ia3"
    config = IA3Config

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_out,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_out  # y ⊙ g

    @staticmethod
    def init(layer, cfg):
        pass  # g = 1 is the whole init

    @staticmethod
    def forward(layer, x, y):
        return y * layer.lora_g

    @staticmethod
    def merged_weight(layer, W, bias):
        g = layer.lora_g.float()
        return g[:, None] * W, None if bias is None else g * bias
