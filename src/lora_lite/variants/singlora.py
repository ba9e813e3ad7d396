"""SingLoRA: Bensaïd et al. 2025, "SingLoRA: Low Rank Adaptation Using a Single Matrix", arXiv 2507.05566.
PEFT has no SingLoRA.

One matrix and its own transpose, ramped in from zero:
    d = max(d_in, d_out);  A: (r, d) kaiming-uniform (fan_in d, like LoRA's A), trainable
    ΔW = s · u(t) · A[:, :d_out]ᵀ A[:, :d_in]      (d_out, d_in): the top-left block of s·u·AᵀA (the paper's
                                                   extension to non-square W);  s = alpha / r
    u(t) = min(t / ramp_steps, 1),  y' = y + s·u·(x A[:, :d_in]ᵀ) A[:, :d_out]
t counts this adapter's training forwards: a frozen buffer `lora_step`, read before and incremented after each
forward in train mode with grad enabled, and saved, so training resumes on the same ramp after load. It counts
forwards, not optimizer steps: with gradient accumulation (or checkpointing, which reruns the forward) give
ramp_steps in forwards. It is exact up to 2**24 in fp32 storage; 16-bit storage (cfg.dtype) is refused when
ramp_steps exceeds its integer range (bf16: 256, fp16: 2048), and a model moved to 16 bits after attach counts
only that far.
Identity at init is exact because u(0) = 0 (A itself is random); A has no gradient at t = 0 and one from t = 1.
Hook-only: works on quantized layers. Exactly rank r: exports as a LoRA (A[:, :d_in], A[:, :d_out]ᵀ, s·u).
Trainable params per layer: r·max(d_in, d_out), about half of LoRA's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LowRankConfig
from ..errors import ConfigError
from ..variant import ParamSpec, check_rank, register
from .lora import add_low_rank

_EXACT_COUNT = {torch.bfloat16: 2 ** 8, torch.float16: 2 ** 11}  # largest integer each counts to without a gap


@dataclass
class SingLoRAConfig(LowRankConfig):
    ramp_steps: int = 100


def ramp(step: torch.Tensor, cfg) -> torch.Tensor:
    """u(t) = min(t / ramp_steps, 1) as a (1,) tensor, from the stored step counter."""
    return (step / cfg.ramp_steps).clamp(max=1.0)


@register
class SingLoRA:
    name = "singlora"
    config = SingLoRAConfig
    paper = ("Bensaïd+ 2025", "https://arxiv.org/abs/2507.05566")
    layer_kinds = ("linear",)
    params_per_layer = "r·max(d_in, d_out)"
    bench = {"r": 32, "alpha": 32.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}, "knobs": {"ramp_steps": 10}}

    @staticmethod
    def check(d_in, d_out, cfg):
        check_rank(d_in, d_out, cfg)
        if cfg.ramp_steps < 1:
            raise ConfigError(f"singlora: ramp_steps={cfg.ramp_steps} must be >= 1; the ramp u = t/ramp_steps is "
                              "what makes the adapter start at the base model")
        limit = _EXACT_COUNT.get(cfg.dtype)
        if limit is not None and cfg.ramp_steps > limit:
            raise ConfigError(f"singlora: {cfg.dtype} storage counts steps exactly only up to {limit}, below "
                              f"ramp_steps={cfg.ramp_steps}; keep dtype=None (fp32 master tensors) or pass "
                              f"ramp_steps<={limit}")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, max(d_in, d_out)), "kaiming"),
                "lora_step": ParamSpec((1,), "zeros", trainable=False, as_buffer=True)}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r + cfg.r * d_out  # x A_inᵀ, · s·u, · A_out

    @staticmethod
    def forward(a, x, y):
        A = a.lora_A
        h = F.linear(x, A[:, :a.d_in]) * (a.cfg.scale * ramp(a.master.lora_step, a.cfg)).to(x.dtype)
        out = add_low_rank(y, h, A[:, :a.d_out].T)
        if a.master.training and torch.is_grad_enabled():
            with torch.no_grad():
                a.master.lora_step.add_(1)
        return out

    @staticmethod
    def lora_factors(a):
        A = a.lora_A.float()
        return A[:, :a.d_in], A[:, :a.d_out].T, a.cfg.scale * float(ramp(a.lora_step, a.cfg))

    @staticmethod
    def delta_weight(a):
        A_in, B, s = SingLoRA.lora_factors(a)
        return s * (B @ A_in)
