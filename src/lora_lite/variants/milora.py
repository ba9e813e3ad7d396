"""MiLoRA: Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning", arXiv 2406.09044.

PiSSA's mirror image: the factors start on the r *smallest* singular triplets of W, so fine-tuning works in
the directions pre-training used least, and the principal part of W (its knowledge) stays in the frozen base:
    W = U S Vh (exact, k = min(d_in, d_out)),  m = the last r indices,  S' = S_m / s
    B0 = U_m √S'  (d_out, r)      A0 = √S' Vh_m  (r, d_in)      W_res = W − s·B0 A0 = U_{:k−r} S_{:k−r} Vh_{:k−r}
    y' = x W_resᵀ + s · (x Aᵀ) Bᵀ,   s = alpha / r   (alpha / √r with use_rslora)
    A, B start at A0, B0 and train; A0, B0 are frozen buffers, kept so the residual can be rebuilt on load

Dividing S by s (as PiSSA does) makes the starting product s·B0 A0 the minor part of W for any alpha. The SVD
is always exact: a randomized SVD cannot find the bottom of the spectrum. W_res is written into the layer
(`base_delta`) and W restored bit-exactly on detach; identity holds up to one rounding of W_res. Needs a dense
float weight (nn.Linear, Conv1D or a conv: its (d_out, d_in) view `a.weight`, like PiSSA). PEFT has no MiLoRA (its "mica" init also uses minor components, but freezes B and zeroes A).
Exports to PEFT as a rank-2r LoRA, like PiSSA. Trainable params per layer: r·(d_in + d_out), plus as many frozen.
"""

from dataclasses import dataclass

import torch

from ..config import LowRankConfig
from ..svd import bottom_r_svd
from ..variant import check_rank, register
from .pissa import PiSSA


@dataclass
class MiLoRAConfig(LowRankConfig):
    pass


@register
class MiLoRA:
    name = "milora"
    config = MiLoRAConfig
    paper = ("Wang+ 2024", "https://arxiv.org/abs/2406.09044")
    layer_kinds = ("linear", "conv1d_gpt2", "conv")
    params_per_layer = "r·(d_in + d_out)"
    bench = {"r": 32, "alpha": "r", "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}
    needs_dense_weight = True

    check = staticmethod(check_rank)
    param_specs = staticmethod(PiSSA.param_specs)
    forward = staticmethod(PiSSA.forward)
    added_macs = staticmethod(PiSSA.added_macs)
    delta_weight = staticmethod(PiSSA.delta_weight)
    base_delta = staticmethod(PiSSA.base_delta)
    lora_factors = staticmethod(PiSSA.lora_factors)

    @staticmethod
    @torch.no_grad()
    def init(a):
        U, S, Vh = bottom_r_svd(a.weight, a.cfg.r)
        root = (S / a.cfg.scale).sqrt()
        for name, value in (("lora_A", root[:, None] * Vh), ("lora_B", U * root[None, :])):
            getattr(a, name).copy_(value)
            getattr(a, name + "0").copy_(value)
