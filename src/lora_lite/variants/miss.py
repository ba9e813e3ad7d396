"""MiSS: Kang & Yin 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing"
(formerly Bone), arXiv 2409.15371. Matches PEFT's MiSS (init_weights True / "mini" / "bat").

One small shard D is shared by every block of W. With x cut into d_in/r shards of r (zero-padded at the end):
    mode "miss":  ΔW[o, i] = D[i mod r, o]          D: (r, d_out)        y' = y + (Σ_shards x_s) D
    mode "mini":  D: (r, mini_r), tiled d_out/mini_r times along the output (the smallest adapter)
    mode "bat":   ΔW_jk = W_jk D_j + D_j for the (r, r) block (j, k) of W   D: (d_out/r, r, r)
All D start at zero, so identity at init is exact and D has a gradient at step 0.
"miss" and "mini" never read W (hook-only, work on quantized layers) and are exactly rank r: ΔW = Dᵀ S with S
the fixed (r, d_in) shard-sum matrix, so they export as a plain LoRA (A = S, B = Dᵀ). "bat" rebuilds ΔW from W
every call (a dense matmul per token; a 4/8-bit W is dequantized per call) and has no LoRA export.
Trainable params per layer: r·d_out (miss), r·mini_r (mini), d_out·r (bat).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..errors import ConfigError, ConversionError
from ..variant import ParamSpec, register
from .hira import frozen_weight

_MODES = ("miss", "mini", "bat")


@dataclass
class MiSSConfig(RankConfig):
    r: int = 64
    mode: str = "miss"
    mini_r: int = 1


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """(..., d_in) -> (..., r): the sum of x's consecutive r-wide shards, the last one zero-padded."""
    x = F.pad(x, (0, -x.shape[-1] % r))
    return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2)


def shard_matrix(d_in: int, r: int, device) -> torch.Tensor:
    """S (r, d_in) with S[k, i] = 1 where i mod r == k: shard_sum(x) = x Sᵀ."""
    cols = torch.arange(d_in, device=device)
    return (cols[None, :] % r == torch.arange(r, device=device)[:, None]).float()


def full_shard(a) -> torch.Tensor:
    """D as (r, d_out): mini's (r, mini_r) tiled along the output."""
    D = a.lora_D
    return D.repeat(1, a.d_out // a.cfg.mini_r) if a.cfg.mode == "mini" else D


def bat_delta(a, W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    r = a.cfg.r
    blocks = W.reshape(a.d_out // r, r, a.d_in // r, r).permute(2, 0, 1, 3)  # [k, j]: the (r, r) block W_jk
    return (blocks @ D + D).permute(1, 2, 0, 3).reshape(a.d_out, a.d_in)


@register
class MiSS:
    name = "miss"
    config = MiSSConfig
    paper = ("Kang & Yin 2024", "https://arxiv.org/abs/2409.15371")
    layer_kinds = ("linear",)
    params_per_layer = "r·d_out (miss), r·mini_r (mini), d_out·r (bat)"
    bench = {"r": 64, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 3e-3}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        init = {"miss": True, "mini": "mini", "bat": "bat"}[cfg.mode]
        label = "MissConfig" if cfg.mode == "miss" else f'MissConfig(init_weights="{cfg.mode}")'
        return peft.MissConfig(r=cfg.r, init_weights=init, mini_r=cfg.mini_r, target_modules=list(targets)), label

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.mode not in _MODES:
            raise ConfigError(f"miss: mode={cfg.mode!r} is not one of {_MODES}")
        if cfg.r > d_in:
            raise ConfigError(f"miss: r={cfg.r} exceeds the layer's d_in={d_in} (a shard is r inputs wide); pass "
                              f"r<={d_in}, or exclude that layer")
        if cfg.mode == "mini" and (cfg.mini_r < 1 or d_out % cfg.mini_r):
            raise ConfigError(f"miss: mini_r={cfg.mini_r} must divide the layer's d_out={d_out} (divisible); pick a "
                              "divisor of every target's output size")
        if cfg.mode == "bat" and (d_in % cfg.r or d_out % cfg.r):
            raise ConfigError(f"miss: mode='bat' cuts W into (r, r) blocks, so r={cfg.r} must divide d_in={d_in} and "
                              f"d_out={d_out} (divisible); pick r dividing every target's sizes")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        shape = {"miss": (cfg.r, d_out), "mini": (cfg.r, cfg.mini_r), "bat": (d_out // cfg.r, cfg.r, cfg.r)}
        return {"lora_D": ParamSpec(shape[cfg.mode], "zeros")}

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        if cfg.mode == "bat":
            return d_in * d_out  # x ΔWᵀ; building ΔW from W (d_out·d_in·r) is per call
        if cfg.mode == "mini":
            return d_in + cfg.r * cfg.mini_r + d_out  # shard sum, · D, tiled add
        return d_in + cfg.r * d_out  # shard sum, · D

    @staticmethod
    def forward(a, x, y):
        if a.cfg.mode == "bat":
            return y + F.linear(x, bat_delta(a, frozen_weight(a.base, y.dtype), a.lora_D))
        h = shard_sum(x, a.cfg.r)
        if a.cfg.mode == "mini":  # (..., mini_r), then tiled over the output: never builds the (r, d_out) D
            small = h @ a.lora_D
            return (y.unflatten(-1, (-1, a.cfg.mini_r)) + small.unsqueeze(-2)).flatten(-2)
        return y + h @ a.lora_D

    @staticmethod
    def delta_weight(a):
        if a.cfg.mode == "bat":
            return bat_delta(a, frozen_weight(a.base, torch.float32), a.lora_D.float())
        return full_shard(a).float().T @ shard_matrix(a.d_in, a.cfg.r, a.lora_D.device)

    @staticmethod
    def lora_factors(a):
        if a.cfg.mode == "bat":
            raise ConversionError("miss: mode='bat' multiplies blocks of W, so its change is not low-rank and has no "
                                  "LoRA export; merge it into the weights instead (lora_lite.merge)")
        return shard_matrix(a.d_in, a.cfg.r, a.lora_D.device), full_shard(a).float().T, 1.0
