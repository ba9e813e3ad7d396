"""LoRA-GA: Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000.

LoRA whose factors start on singular vectors of the full fine-tuning gradient, so that LoRA's first step
matches full fine-tuning's best rank-2r step; the starting product is taken out of W:
    G = mean over calibration batches of ∂loss/∂W  (d_out, d_in)      G ≈ U S Vh, top 2r (svd / niter)
    direction "ArB2r": A0 = c·Vh[:r],  B0 = c·U[:, r:2r]     "A2rBr": A0 = c·Vh[r:2r], B0 = c·U[:, :r]
              "ArBr":  A0 = c·Vh[1::2], B0 = c·U[:, 0::2]    (A0: (r, d_in), B0: (d_out, r), orthonormal up to c)
    init_scale "stable": c = d_out^¼ / √stable_gamma       "unit": c = 1       "gd": c = 1/s
    W_res = W − s·B0 A0,    y' = x W_resᵀ + s · (x Aᵀ) Bᵀ,    s = alpha / r   (alpha / √r with use_rslora)
    A, B start at A0, B0 and train; A0, B0 are frozen buffers, so load rebuilds W_res without data

Why: at init ∇_B = s·G Aᵀ and ∇_A = s·Bᵀ G, so one SGD step changes the adapter by
−η·s·(∇_B A + B ∇_A) = −η·s²·c²·(G V_A V_Aᵀ + U_B U_Bᵀ G) (V_A, U_B: the vectors A and B took), which is
−η·s²·c² times the best rank-2r approximation of G ("gd": exactly full fine-tuning's step, projected;
tests/test_gradient_inits.py checks it). The math is the paper's Algorithm 1 and its reference code
(Outsider565/LoRA-GA). PEFT 0.21's "lora_ga" init differs: its B carries the gradient's singular values
(U[:, r:2r]·diag(S)) and its "stable" scale multiplies B only, so its first step is not that projection. The
knob names, defaults and the gradient estimate (the mean of per-batch gradients) are PEFT's; its random direction
and "weight_svd" scale are left out. Requires calibration_data whose batches give a loss
(lora_lite.calibration.weight_gradients); identity holds up to one rounding of W_res. Needs a dense nn.Linear
(linear layers only: the gradient pass reads layer.weight's own layout) and 2r ≤ min(d_in, d_out). Trainable params per layer: r·(d_in + d_out), plus as many frozen.
"""

from dataclasses import dataclass

import torch

from ..calibration import weight_gradients
from ..config import LowRankConfig
from ..errors import ConfigError
from ..svd import SVDInitConfig, check_svd_options, top_r_svd
from ..variant import register
from .lora import peft_lora
from .pissa import PiSSA

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
INIT_SCALES = ("stable", "unit", "gd")
PEFT_SCALE = {"stable": "stable", "unit": "unit", "gd": "gd_scale"}


@dataclass
class LoRAGAConfig(SVDInitConfig, LowRankConfig):
    """direction     which singular vectors of G go to A and which to B (see above); "ArB2r" is the paper's.
    init_scale    "stable" (the paper's default), "unit" or "gd" (the first step equals full fine-tuning's).
    stable_gamma  γ of the "stable" scale c = d_out^¼ / √γ."""

    direction: str = "ArB2r"
    init_scale: str = "stable"
    stable_gamma: float = 16.0


def pick_factors(U, Vh, r: int, direction: str):
    """(A (r, d_in), B (d_out, r)) from the top-2r singular vectors of G, in the paper's index split."""
    if direction == "ArB2r":
        return Vh[:r], U[:, r:2 * r]
    if direction == "A2rBr":
        return Vh[r:2 * r], U[:, :r]
    return Vh[1:2 * r:2], U[:, 0:2 * r:2]


@register
class LoRAGA:
    name = "lora_ga"
    config = LoRAGAConfig
    paper = ("Wang+ 2024", "https://arxiv.org/abs/2407.05000")
    layer_kinds = ("linear",)
    params_per_layer = "r·(d_in + d_out); needs calibration_data with a loss"
    bench = {"r": 32, "alpha": 64.0, "lr": {"qwen": 2e-5, "stories": 1e-3, "tiny": 3e-3}}
    needs_dense_weight = True
    requires_calibration = True

    param_specs = staticmethod(PiSSA.param_specs)
    forward = staticmethod(PiSSA.forward)
    added_macs = staticmethod(PiSSA.added_macs)
    delta_weight = staticmethod(PiSSA.delta_weight)
    base_delta = staticmethod(PiSSA.base_delta)
    lora_factors = staticmethod(PiSSA.lora_factors)

    @staticmethod
    def peft(cfg, targets):
        import peft

        ga = peft.LoraGAConfig(direction=cfg.direction, scale=PEFT_SCALE[cfg.init_scale],
                               stable_gamma=cfg.stable_gamma)
        return (peft_lora(cfg, targets, init_lora_weights="lora_ga", lora_ga_config=ga),
                'LoraConfig(init_lora_weights="lora_ga")')

    @staticmethod
    def check(d_in, d_out, cfg):
        check_svd_options(cfg)
        if 2 * cfg.r > min(d_in, d_out):
            raise ConfigError(f"lora_ga: 2r={2 * cfg.r} singular vectors of the gradient are needed but a "
                              f"{d_in}->{d_out} layer has min(d_in, d_out)={min(d_in, d_out)}; pass "
                              f"r<={min(d_in, d_out) // 2}, or exclude that layer")
        if cfg.direction not in DIRECTIONS or cfg.init_scale not in INIT_SCALES:
            raise ConfigError(f"lora_ga: direction={cfg.direction!r} must be one of {DIRECTIONS} and "
                              f"init_scale={cfg.init_scale!r} one of {INIT_SCALES}")
        if not cfg.stable_gamma > 0:
            raise ConfigError(f"lora_ga: stable_gamma={cfg.stable_gamma} must be > 0")

    @staticmethod
    @torch.no_grad()
    def group_init(model, adapters, cfg, calibration_data):
        # every factor starts at zero, so the gradient pass sees the base model. a.cfg is each layer's config
        # (its r and alpha from rank_pattern / alpha_pattern); cfg the one attach was given
        grads = weight_gradients(model, [a.base for a in adapters], calibration_data,
                                 min_tokens=2 * max(a.cfg.r for a in adapters), variant=cfg.variant)
        for a, G in zip(adapters, grads, strict=True):
            c = a.cfg
            U, _, Vh = top_r_svd(G, 2 * c.r, c.svd, c.niter)
            A, B = pick_factors(U, Vh, c.r, c.direction)
            if c.init_scale == "stable":
                A, B = (t * (a.d_out ** 0.25 / c.stable_gamma ** 0.5) for t in (A, B))
            elif c.init_scale == "gd":
                A, B = A / c.scale, B / c.scale
            for name, value in (("lora_A", A), ("lora_B", B)):
                getattr(a, name).copy_(value)
                getattr(a, name + "0").copy_(value)
