"""LoRA-One: Zhang, Liu & Chen 2025, "LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large
Language Models, Provably and Efficiently", arXiv 2502.01235 (ICML 2025).

LoRA whose factors start on the best rank-r approximation of one full fine-tuning gradient step:
    G = mean over calibration batches of ∂loss/∂W  (d_out, d_in)      −G ≈ U S Vh, top r (svd / niter)
    B0 = U √S / √(σ₁ γ)  (d_out, r)      A0 = √S Vh / √(σ₁ γ)  (r, d_in)      σ₁ = S[0], γ = stable_gamma
    so s·B0 A0 = −(s / (γ σ₁)) · G_r: one gradient step of rank r whose largest singular value is s/γ
    y' = x W_resᵀ + s · (x Aᵀ) Bᵀ,   s = alpha / r   (alpha / √r with use_rslora, the paper's setting)
    take_step=False (default): W_res = W − s·B0 A0, so attach is an identity like every method here and
                     training starts from the base model with A, B already on G's top-r singular subspaces
    take_step=True:  W_res = W, the paper's init: attaching takes that step (outputs change at attach)
    A, B start at A0, B0 and train; A0, B0 are frozen buffers, so load rebuilds W_res without data

The normalisation by σ₁ and γ = 128 follow the reference code (YuanheZ/LoRA-One, "stable" scale); the paper's
preconditioned optimizer is not part of the init and is left to the training loop. PEFT has no LoRA-One.
Requires calibration_data whose batches give a loss (lora_lite.calibration.weight_gradients). Reads W's
gradient, so it needs a dense nn.Linear. Either way it counts as a weight-rewriting method (one per layer, not
mixable per_row; with take_step=True the rewrite is W − 0). The benchmark runs the paper's setting (take_step,
rsLoRA, r 8, alpha 16). Trainable params per layer: r·(d_in + d_out), plus as many frozen.
"""

from dataclasses import dataclass

import torch

from ..calibration import weight_gradients
from ..config import LowRankConfig
from ..errors import ConfigError
from ..svd import SVDInitConfig, check_svd_init, top_r_svd
from ..variant import register
from .lora import LoRA
from .pissa import PiSSA


@dataclass
class LoRAOneConfig(SVDInitConfig, LowRankConfig):
    """stable_gamma  γ: the initial step's largest singular value is s/γ.
    take_step     True: attach takes the step, as the paper does (not an identity); False: it is subtracted."""

    stable_gamma: float = 128.0
    take_step: bool = False


@register
class LoRAOne:
    name = "lora_one"
    config = LoRAOneConfig
    paper = ("Zhang+ 2025", "https://arxiv.org/abs/2502.01235")
    layer_kinds = ("linear",)
    params_per_layer = "r·(d_in + d_out); needs calibration_data with a loss"
    # the reference code's run: r 8, alpha 16 with rsLoRA, lr 2e-4 on Llama, the step taken
    bench = {"r": 8, "alpha": 16.0, "lr": {"qwen": 2e-4, "stories": 3e-3, "tiny": 1e-2},
             "knobs": {"use_rslora": True, "take_step": True}}
    needs_dense_weight = True
    requires_calibration = True

    param_specs = staticmethod(PiSSA.param_specs)
    forward = staticmethod(PiSSA.forward)
    added_macs = staticmethod(PiSSA.added_macs)
    delta_weight = staticmethod(PiSSA.delta_weight)

    @staticmethod
    def check(d_in, d_out, cfg):
        check_svd_init(d_in, d_out, cfg)
        if not cfg.stable_gamma > 0:
            raise ConfigError(f"lora_one: stable_gamma={cfg.stable_gamma} must be > 0")

    @staticmethod
    def base_delta(a):
        if a.cfg.take_step:
            return torch.zeros(a.d_out, a.d_in)
        return PiSSA.base_delta(a)

    @staticmethod
    def lora_factors(a):
        return LoRA.lora_factors(a) if a.cfg.take_step else PiSSA.lora_factors(a)

    @staticmethod
    @torch.no_grad()
    def group_init(model, adapters, cfg, calibration_data):
        # every factor starts at zero, so the gradient pass sees the base model. a.cfg is each layer's config
        # (its r and alpha from rank_pattern / alpha_pattern); cfg the one attach was given
        grads = weight_gradients(model, [a.base for a in adapters], calibration_data,
                                 min_tokens=max(a.cfg.r for a in adapters), variant=cfg.variant)
        for a, G in zip(adapters, grads, strict=True):
            U, S, Vh = top_r_svd(-G, a.cfg.r, a.cfg.svd, a.cfg.niter)
            root = (S / (S[0].clamp_min(torch.finfo(S.dtype).tiny) * a.cfg.stable_gamma)).sqrt()
            for name, value in (("lora_A", root[:, None] * Vh), ("lora_B", U * root[None, :])):
                getattr(a, name).copy_(value)
                getattr(a, name + "0").copy_(value)
