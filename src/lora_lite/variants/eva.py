"""EVA: Paischer et al. 2024, "One Initialization to Rule them All: Explained Variance Adaptation",
arXiv 2410.07170.

LoRA whose A starts on the directions that explain most of the layer's input variance on real data:
    X: (N, d_in) the layer's non-padding calibration inputs;  A0 = top-r right singular vectors of X
       (computed as the top-r eigenvectors of C = XᵀX / N, which are the same vectors)
    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r
    A: (r, d_in) = A0, trainable      B: (d_out, r) zeros, trainable

Identity at init is exact because B = 0. Requires calibration_data: attach() raises CalibrationError before
touching the model without it, and a layer that sees fewer than r tokens raises too. A lives in the saved
lora_A, so load() needs no data. Hook-only (reads inputs, never W), so it works on bitsandbytes layers.
Simplifications vs PEFT: one uniform rank (no explained-variance rank redistribution), one exact
decomposition of the accumulated covariance (no incremental PCA or convergence check).
Trainable params per layer: r·(d_in + d_out).
"""

from dataclasses import dataclass

import torch

from ..calibration import input_moments
from ..config import LowRankConfig
from ..variant import ParamSpec, check_rank, register
from .lora import LoRA


@dataclass
class EVAConfig(LowRankConfig):
    pass


@register
class EVA:
    name = "eva"
    config = EVAConfig
    paper = ("Paischer+ 2024", "https://arxiv.org/abs/2410.07170")
    params_per_layer = "r·(d_in + d_out); needs calibration_data"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}}
    requires_calibration = True

    @staticmethod
    def check(d_in, d_out, cfg):  # A holds r eigenvectors of the (d_in, d_in) input covariance; any d_out
        check_rank(d_in, d_in, cfg)

    forward = staticmethod(LoRA.forward)
    delta_weight = staticmethod(LoRA.delta_weight)
    added_macs = staticmethod(LoRA.added_macs)
    lora_factors = staticmethod(LoRA.lora_factors)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "zeros"), "lora_B": ParamSpec((d_out, cfg.r), "zeros")}

    @staticmethod
    @torch.no_grad()
    def group_init(model, adapters, cfg, calibration_data):
        # A starts at zero and B = 0, so the calibration forwards see the base model
        moments = input_moments(model, [a.base for a in adapters], calibration_data, min_tokens=cfg.r, variant=cfg.variant)
        for a, C in zip(adapters, moments, strict=True):
            _, Q = torch.linalg.eigh(C.to(a.lora_A.device))  # ascending eigenvalues
            a.lora_A.copy_(Q[:, -cfg.r:].flip(-1).T)
