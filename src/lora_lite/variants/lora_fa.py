"""LoRA-FA: Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv 2308.03303.

LoRA with the down-projection A frozen at its random init; only B trains:
    y' = y + s · (x Aᵀ) Bᵀ,      s = alpha / r   (alpha / √r with use_rslora)
    A: (r, d_in)  kaiming-uniform, frozen buffer (saved)      B: (d_out, r)  zeros, trainable

Why: B's gradient needs only the r-dimensional x Aᵀ, not x, so backward keeps (..., r) activations per layer
instead of (..., d_in), and there is no gradient or optimizer state for A. ΔW = s·B A always lies in the row
space of A, fixed at init. Identity at init is exact because B = 0. Hook-only, so it works on bitsandbytes layers.
On Conv1D and convs too, through LoRA's forward (`a.project`); not on embeddings or expert parameters.

PEFT's equivalent is a LoRA whose A `create_lorafa_optimizer` freezes; that optimizer is AdamW that also
preconditions B's gradient by (s² A Aᵀ)⁻¹ (a later refinement of the method). Here any optimizer can be used;
the preconditioning is the identity when A has orthonormal rows and s = 1 (tests/test_lora_family.py).
Trainable params per layer: r·d_out (plus r·d_in frozen).
"""

from dataclasses import dataclass

from ..config import LowRankConfig
from ..variant import ParamSpec, check_rank, register
from .lora import LoRA, peft_lora


@dataclass
class LoRAFAConfig(LowRankConfig):
    pass


@register
class LoRAFA:
    name = "lora_fa"
    config = LoRAFAConfig
    paper = ("Zhang+ 2023", "https://arxiv.org/abs/2308.03303")
    layer_kinds = ("linear", "conv1d_gpt2", "conv")
    params_per_layer = "r·d_out (A: r·d_in, frozen)"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}

    check = staticmethod(check_rank)
    forward = staticmethod(LoRA.forward)
    added_macs = staticmethod(LoRA.added_macs)
    delta_weight = staticmethod(LoRA.delta_weight)
    lora_factors = staticmethod(LoRA.lora_factors)

    @staticmethod
    def peft(cfg, targets):
        return peft_lora(cfg, targets), "LoraConfig + create_lorafa_optimizer"

    @staticmethod
    def peft_prepare(peft_model, cfg):
        # what create_lorafa_optimizer does to the model before it builds its optimizer
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming", trainable=False, as_buffer=True),
                "lora_B": ParamSpec((d_out, cfg.r), "zeros")}
