"""OLoRA: Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775.

LoRA whose factors start on the first r columns of a QR decomposition of W, with that part taken out of W:
    W = Q R              torch.linalg.qr of W (d_out, d_in), reduced: Q (d_out, k) orthonormal columns, k = min(d)
    B0 = Q[:, :r]  (d_out, r), B0ᵀ B0 = I_r        A0 = R[:r]  (r, d_in), upper triangular in its first r columns
    W_res = W − s·B0 A0,     y' = x W_resᵀ + s · (x Aᵀ) Bᵀ,     s = alpha / r   (alpha / √r with use_rslora)
    A, B start at A0, B0 and train; A0, B0 are frozen buffers, kept so the residual can be rebuilt on load

The paper writes the update as Q_r R_r; in the (A, B) layout used here (PEFT's) the orthonormal factor is B.
Unlike PiSSA, R is not divided by s (as in the paper and PEFT), so the adapter starts at s·Q_r R_r.
The runtime writes W_res into the layer (`base_delta`) and restores W bit-exactly on detach; identity holds up
to one rounding of W_res to W's dtype. Needs a dense float weight (nn.Linear, Conv1D or a conv, factored as
its (d_out, d_in) view `a.weight`, like PiSSA). Exports to PEFT as a rank-2r LoRA ([B, −B0], [A; A0]), like
PiSSA. Trainable params per layer: r·(d_in + d_out), plus as many frozen.
"""

from dataclasses import dataclass

import torch

from ..config import LowRankConfig
from ..variant import check_rank, register
from .lora import peft_lora
from .pissa import PiSSA


@dataclass
class OLoRAConfig(LowRankConfig):
    pass


@register
class OLoRA:
    name = "olora"
    config = OLoRAConfig
    paper = ("Büyükakyüz 2024", "https://arxiv.org/abs/2406.01775")
    layer_kinds = ("linear", "conv1d_gpt2", "conv")
    params_per_layer = "r·(d_in + d_out)"
    bench = {"r": 32, "alpha": "r", "lr": {"qwen": 1e-4, "stories": 1e-3, "tiny": 3e-3}}
    needs_dense_weight = True

    check = staticmethod(check_rank)
    param_specs = staticmethod(PiSSA.param_specs)
    forward = staticmethod(PiSSA.forward)
    added_macs = staticmethod(PiSSA.added_macs)
    delta_weight = staticmethod(PiSSA.delta_weight)
    base_delta = staticmethod(PiSSA.base_delta)
    lora_factors = staticmethod(PiSSA.lora_factors)

    @staticmethod
    def peft(cfg, targets):
        return peft_lora(cfg, targets, init_lora_weights="olora"), 'LoraConfig(init_lora_weights="olora")'

    @staticmethod
    @torch.no_grad()
    def init(a):
        Q, R = torch.linalg.qr(a.weight.float())
        r = a.cfg.r
        for name, value in (("lora_A", R[:r]), ("lora_B", Q[:, :r])):
            getattr(a, name).copy_(value)
            getattr(a, name + "0").copy_(value)
