"""VeRA: Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454.
Matches PEFT's VeRA.

One pair of frozen random projections is shared by every adapted layer; each layer trains two vectors:
    P_A: (r, max d_in), P_B: (max d_out, r)   kaiming-uniform, frozen, shared; a layer slices A = P_A[:, :d_in],
                                              B = P_B[:d_out]
    y' = y + b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)            d: (r,) = d_initial (0.1), b: (d_out,) zeros, both trainable
The projections are PEFT's, bit for bit: P_A then P_B drawn by a CPU generator seeded with `seed` (PEFT's
projection_prng_key), sized by the largest adapted layer. They are never stored: `group_setup` draws them on
attach and again on load (same targets, same sizes, same values for a given torch version) and gives each layer
non-persistent views of the one pair, so a file holds only r + d_out numbers per layer and memory holds one pair
per device (model.to(dtype) after attach gives each layer its own converted copy).
Identity at init is exact: b = 0. b trains from step 0, d from step 1.
Hook-only: works on quantized layers. Exactly rank r: exports as a LoRA (A' = diag(d) A, B' = diag(b) B).
Trainable params per layer: r + d_out.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..runtime import storage_dtype
from ..variant import ParamSpec, register


@dataclass
class VeRAConfig(RankConfig):
    r: int = 256
    d_initial: float = 0.1
    seed: int = 0


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_A, P_B) in fp32 on the CPU: kaiming-uniform (gain √2, fan_in = size(1)), P_A drawn first."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        drawn.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return drawn[0], drawn[1]


@register
class VeRA:
    name = "vera"
    config = VeRAConfig
    paper = ("Kopiczko+ 2024", "https://arxiv.org/abs/2310.11454")
    layer_kinds = ("linear",)
    params_per_layer = "r + d_out (random projections shared, not stored)"
    bench = {"r": 256, "lr": {"qwen": 4e-3, "stories": 3e-2, "tiny": 1e-1}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.VeraConfig(r=cfg.r, d_initial=cfg.d_initial, projection_prng_key=cfg.seed,
                                target_modules=list(targets)), "VeraConfig")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_d": ParamSpec((cfg.r,), lambda t: t.fill_(cfg.d_initial)), "lora_b": ParamSpec((d_out,), "zeros")}

    @staticmethod
    def group_setup(model, adapters, cfg, loaded):
        # one pair for every layer, of the largest r any layer has (rank_pattern); a layer uses its first a.cfg.r
        r = max(a.cfg.r for a in adapters)
        P_A, P_B = projections(r, max(a.d_in for a in adapters), max(a.d_out for a in adapters), cfg.seed)
        placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        for a in adapters:
            key = (a.lora_b.device, storage_dtype(a.base, cfg))
            if key not in placed:
                placed[key] = (P_A.to(*key), P_B.to(*key))
            A, B = placed[key]
            a.register_buffer("lora_proj_A", A[:a.cfg.r, :a.d_in], persistent=False)
            a.register_buffer("lora_proj_B", B[:a.d_out, :a.cfg.r], persistent=False)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return cfg.r * d_in + cfg.r + cfg.r * d_out + d_out  # x Aᵀ, ⊙ d, · Bᵀ, ⊙ b

    @staticmethod
    def forward(a, x, y):
        return y + a.lora_b * F.linear(a.lora_d * F.linear(x, a.lora_proj_A), a.lora_proj_B)

    @staticmethod
    def lora_factors(a):
        return a.lora_d.float()[:, None] * a.lora_proj_A.float(), a.lora_b.float()[:, None] * a.lora_proj_B.float(), 1.0

    @staticmethod
    def delta_weight(a):
        A, B, _ = VeRA.lora_factors(a)
        return B @ A
