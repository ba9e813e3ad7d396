"""PiSSA: Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", arXiv 2404.02948.

LoRA whose factors start on the top-r singular triplets of W, with the rest left in the base weight:
    W = U S Vh,  S' = S_r / s,  B0 = U_r √S',  A0 = √S' Vh_r,   W_res = W − s·B0 A0
    y' = x W_resᵀ + s · (x Aᵀ) Bᵀ          (A, B start at A0, B0 and train)
    A, B: (r, d_in), (d_out, r) trainable     A0, B0: frozen buffers, kept so the residual can be rebuilt

Dividing S by s (as PEFT does) gives the same starting product s·B0A0 = U_r S_r Vh_r for any alpha.
The runtime writes W_res into the layer (through `base_delta`) and restores the original W bit-exactly on
detach. A0/B0 are saved, so load rebuilds W_res without an SVD and a rank-2r PEFT export is exact.
Merging adds s·B A to W_res; the merged weight is W_res + s·B A, not the original W.
Identity holds up to one rounding of W_res to W's dtype. Needs a dense float weight (no quantized bases):
nn.Linear, Conv1D or a conv, whose (d_out, d_in) view (`a.weight`) is what the SVD factors.
Trainable params per layer: r·(d_in + d_out), plus as many frozen.
"""

from dataclasses import dataclass

import torch

from ..config import LowRankConfig
from ..svd import SVDInitConfig, check_svd_init, top_r_svd
from ..variant import ParamSpec, register
from .lora import LoRA, peft_lora


@dataclass
class PiSSAConfig(SVDInitConfig, LowRankConfig):
    pass


@register
class PiSSA:
    name = "pissa"
    config = PiSSAConfig
    paper = ("Meng+ 2024", "https://arxiv.org/abs/2404.02948")
    params_per_layer = "r·(d_in + d_out)"
    bench = {"r": 32, "alpha": "r", "lr": {"qwen": 1e-4, "stories": 1e-3, "tiny": 3e-3}}
    needs_dense_weight = True
    layer_kinds = ("linear", "conv1d_gpt2", "conv")

    forward = staticmethod(LoRA.forward)
    delta_weight = staticmethod(LoRA.delta_weight)
    added_macs = staticmethod(LoRA.added_macs)

    check = staticmethod(check_svd_init)

    @staticmethod
    def peft(cfg, targets):
        init = "pissa" if cfg.svd == "full" else f"pissa_niter_{cfg.niter}"
        return peft_lora(cfg, targets, init_lora_weights=init), f'LoraConfig(init_lora_weights="{init}")'

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ParamSpec((cfg.r, d_in)),
            "lora_B": ParamSpec((d_out, cfg.r)),
            "lora_A0": ParamSpec((cfg.r, d_in), trainable=False, as_buffer=True),
            "lora_B0": ParamSpec((d_out, cfg.r), trainable=False, as_buffer=True),
        }

    @staticmethod
    @torch.no_grad()
    def init(a):
        cfg = a.cfg
        U, S, Vh = top_r_svd(a.weight, cfg.r, cfg.svd, cfg.niter)
        root = (S / cfg.scale).sqrt()
        for name, value in (("lora_A", root[:, None] * Vh), ("lora_B", U * root[None, :])):
            getattr(a, name).copy_(value)
            getattr(a, name + "0").copy_(value)

    @staticmethod
    def base_delta(a):
        return a.cfg.scale * (a.lora_B0.float() @ a.lora_A0.float())

    @staticmethod
    def lora_factors(a):
        """Rank 2r against the original W: W_res + s·B A − W = s·[B, −B0] [A; A0] (PEFT's PiSSA conversion)."""
        A = torch.cat([a.lora_A.float(), a.lora_A0.float()])
        B = torch.cat([a.lora_B.float(), -a.lora_B0.float()], dim=1)
        return A, B, a.cfg.scale
