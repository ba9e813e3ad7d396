"""(IA)³: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv 2205.05638. Output-gate form, meant for k_proj / v_proj.

    y' = y ⊙ g          g: (d_out,) ones at init, trainable   (the bias is gated too, as in PEFT)

Identity is exact. Hook-only, so it works on quantized layers. Trainable params per layer: d_out.
Also on Conv1D and convs (one gate per output channel, as PEFT's IA3 on Conv2d).
Merge: W' = diag(g) W, b' = g ⊙ b. ΔW rescales every row, so it is full rank: no LoRA export.
Keep the default fp32 storage on bf16 models: the spacing of bf16 near 1.0 is 7.8e-3, so updates far below
~4e-3 would round away in a bf16 g.
"""

from dataclasses import dataclass

from ..config import AdapterConfig
from ..variant import ParamSpec, register


@dataclass
class IA3Config(AdapterConfig):
    target_names: tuple[str, ...] | str = (r"(k_proj|v_proj)$",)


@register
class IA3:
    name = "ia3"
    config = IA3Config
    paper = ("Liu+ 2022", "https://arxiv.org/abs/2205.05638")
    params_per_layer = "d_out (output gate, k/v)"
    bench = {"lr": {"qwen": 5e-3, "stories": 3e-2, "tiny": 2e-1}, "targets": (r"(k_proj|v_proj)$",)}
    layer_kinds = ("linear", "conv1d_gpt2", "conv")

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.IA3Config(target_modules=list(targets), feedforward_modules=[]), "IA3Config"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_out,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_out  # y ⊙ g

    @staticmethod
    def forward(a, x, y):
        return y * a.lora_g

    @staticmethod
    def merged_weight(a, W, bias):
        g = a.lora_g.float()
        return g[:, None] * W, None if bias is None else g * bias
