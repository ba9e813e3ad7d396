"""(IA)³ feed-forward form: Liu et al. 2022, arXiv 2205.05638, §3.3; PEFT's `feedforward_modules` branch.

The gate scales the *input* of the FFN's second linear (down_proj / fc2), i.e. the intermediate activation:
    y' = (x ⊙ g) Wᵀ + b        g: (d_in,) ones at init, trainable

Applied in a forward pre-hook. Identity is exact. Hook-only. Trainable params per layer: d_in.
Merge: W' = W diag(g), bias unchanged. ΔW is full rank: no LoRA export.
r and alpha are unused.
"""

from dataclasses import dataclass

from ..config import AdapterConfig
from ..variant import ParamSpec, register


@dataclass
class IA3FFConfig(AdapterConfig):
    variant = "ia3_ff"
    target_names: tuple[str, ...] | str = (r"down_proj$",)


@register
class IA3FF:
    name = "ia3_ff"
    config = IA3FFConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_in,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_in  # x ⊙ g

    @staticmethod
    def init(layer, cfg):
        pass  # g = 1 is the whole init

    @staticmethod
    def forward_input(layer, x):
        return x * layer.lora_g

    @staticmethod
    def merged_weight(layer, W, bias):
        return W * layer.lora_g.float(), bias
