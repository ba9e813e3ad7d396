"""RoAd: Liao et al. 2024, "2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning", arXiv 2409.00119.
Matches PEFT's RoAd layer.

The output is cut into groups of `group_size`; inside a group, coordinate j of the first half and j of the
second half form a 2-D pair that is rotated by θ and scaled by α:
    y' = y ⊙ c1 + rotate_half(y) ⊙ c2,    rotate_half(y) = (−y2, y1) per group
    road_1: c1 = α cos θ, c2 = α sin θ, one (θ, α) per pair       θ, α: (d_out/2,)
    road_2: the same, one (θ, α) per coordinate                   θ, α: (d_out,)
    road_4: separate (θ, α) for the cos and the sin column         θ, α: (2·d_out,)
θ = 0 and α = 1 at init, so identity is exact. The bias is rotated too (PEFT's unmerged path).
rotate_half is linear, so rotate_half(y) ⊙ c2 = rotate_half(y ⊙ swap_halves(c2)): computed that way, backward
keeps only y (shared by both products) instead of y and a rotated copy of it.
Merge: W' = R W, b' = R b. R − I is full rank in general: no LoRA export.
Hook-only: works on quantized layers.
"""

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register

_SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(AdapterConfig):
    road_variant: str = "road_1"
    group_size: int = 64


def columns(a) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-coordinate multipliers (c1, c2), each (d_out,)."""
    cfg, theta, alpha = a.cfg, a.lora_road_theta, a.lora_road_alpha
    half = cfg.group_size // 2
    if cfg.road_variant == "road_1":
        theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
    if cfg.road_variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, cfg.group_size), alpha.reshape(-1, 2, cfg.group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def _rotate(y, c1, c2, half):
    """R y along the last dim: y ⊙ c1 + rotate_half(y) ⊙ c2."""
    grouped = y.reshape(*y.shape[:-1], -1, 2, half)
    rotated = torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(y.shape)
    return y * c1 + rotated * c2


@register
class Road:
    name = "road"
    config = RoadConfig
    paper = ("Liao+ 2024", "https://arxiv.org/abs/2409.00119")
    params_per_layer = "d_out (road_1), 2·d_out (road_2), 4·d_out (road_4)"
    bench = {"lr": {"qwen": 1e-3, "stories": 1e-2, "tiny": 3e-2}, "knobs": {"group_size": 64}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return (peft.RoadConfig(variant=cfg.road_variant, group_size=cfg.group_size, target_modules=list(targets)),
                f'RoadConfig(variant="{cfg.road_variant}")')

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.road_variant not in _SIZES:
            raise ConfigError(f"road: road_variant={cfg.road_variant!r} is not one of {sorted(_SIZES)}")
        gs = cfg.group_size
        if not isinstance(gs, int) or gs <= 0 or gs % 2:
            raise ConfigError(f"road: group_size={gs!r} must be positive and even")
        if d_out % gs:
            raise ConfigError(f"road: group_size={gs} must divide the layer's d_out={d_out} (divisible); "
                              "pick a divisor of every target's output size")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        n = int(d_out * _SIZES[cfg.road_variant])
        return {"lora_road_theta": ParamSpec((n,), "zeros"), "lora_road_alpha": ParamSpec((n,), "ones")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return 2 * d_out  # y ⊙ c1 + rotate_half(y) ⊙ c2

    @staticmethod
    def forward(a, x, y):
        c1, c2 = columns(a)  # in y's dtype: the base output is never re-rounded
        half = a.cfg.group_size // 2
        scaled = (y * c2.reshape(-1, 2, half).flip(1).flatten()).reshape(*y.shape[:-1], -1, 2, half)
        rotated = torch.stack((-scaled[..., 1, :], scaled[..., 0, :]), dim=-2).reshape(y.shape)
        return y * c1 + rotated

    @staticmethod
    def rotation(a) -> torch.Tensor:
        """The explicit (d_out, d_out) matrix R with y' = R y, for merging and tests."""
        c1, c2 = (c.float() for c in columns(a))
        d, half = c1.shape[0], a.cfg.group_size // 2
        idx = torch.arange(d, device=c1.device)
        in_first_half = (idx % (2 * half)) < half
        partner = torch.where(in_first_half, idx + half, idx - half)
        R = torch.diag(c1)
        # rotate_half: out[first] gets −y[partner]·c2, out[second] gets +y[partner]·c2
        R[idx, partner] = torch.where(in_first_half, -c2, c2)
        return R

    @staticmethod
    def merged_weight(a, W, bias):
        # R W = (Wᵀ Rᵀ)ᵀ: rotate the rows of Wᵀ like outputs, O(d_out·d_in) instead of a dense R @ W
        c1, c2 = (c.float() for c in columns(a))
        half = a.cfg.group_size // 2
        return _rotate(W.T, c1, c2, half).T, None if bias is None else _rotate(bias, c1, c2, half)
