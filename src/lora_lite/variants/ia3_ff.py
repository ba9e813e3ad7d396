"""(IA)³ feed-forward form: Liu et al. 2022, arXiv 2205.05638, §3.3; PEFT's `feedforward_modules` branch.

The gate scales the *input* of the FFN's second linear (down_proj / fc2), i.e. the intermediate activation:
    y' = (x ⊙ g) Wᵀ + b        g: (d_in,) ones at init, trainable

Applied in a forward pre-hook. Identity is exact. Hook-only. Trainable params per layer: d_in.
Merge: W' = W diag(g), bias unchanged. ΔW is full rank: no LoRA export.
"""

from dataclasses import dataclass

from ..config import AdapterConfig
from ..variant import ParamSpec, register


@dataclass
class IA3FFConfig(AdapterConfig):
    target_names: tuple[str, ...] | str = (r"down_proj$",)


@register
class IA3FF:
    name = "ia3_ff"
    config = IA3FFConfig
    paper = ("Liu+ 2022", "https://arxiv.org/abs/2205.05638")
    params_per_layer = "d_in (input gate, down_proj)"
    bench = {"lr": {"qwen": 5e-3, "stories": 3e-2, "tiny": 5e-2}, "targets": (r"down_proj$",)}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.IA3Config(target_modules=list(targets), feedforward_modules=list(targets)),
                "IA3Config(feedforward_modules=targets)")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_in,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_in  # x ⊙ g

    @staticmethod
    def forward_input(a, x):
        return x * a.lora_g

    @staticmethod
    def merged_weight(a, W, bias):
        return W * a.lora_g.float(), bias
