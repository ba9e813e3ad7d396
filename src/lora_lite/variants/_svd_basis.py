"""What the AntiPaSTO family shares: a frozen top-r singular basis taken out of W, and the 1+ELU gain.

    W = U diag(S) Vh + W_res       U: (d_out, r)  S: (r,)  Vh: (r, d_in), all frozen `lora_*` buffers
    y' = x W_resᵀ + (path through the basis)

The runtime writes W_res = W − U diag(S) Vh into the layer through `base_delta`, computed from the stored
(already rounded) buffers, so identity costs one rounding of W_res, and restores W bit-exactly on detach.
The buffers are saved, so load() needs neither an SVD nor calibration data. Every member's change against
the original W is U (core − diag S) P, at most rank r, so each exports as an exact PEFT LoRA (lora_factors). The data-driven members store an
oblique input projector P in place of Vh (`lora_P`); everything here takes the input-side buffer's name.

Default r is 256 (only about r scalars train per layer). r above min(d_in, d_out) is a ConfigError naming
the layer and the largest r that fits; it is never silently clipped. The family has no alpha.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..svd import SVDInitConfig, top_r_svd
from ..variant import ParamSpec

PAPER = ("wassname 2026", "https://arxiv.org/abs/2601.07473")
BENCH = {"r": 256, "lr": {"qwen": 5e-3, "stories": 1e-2, "tiny": 3e-2}}


@dataclass
class SVDBasisConfig(SVDInitConfig):
    r: int = 256


@dataclass
class GainConfig(SVDBasisConfig):
    """coeff: runtime steering scalar (0 is identity, < 0 swaps amplify and suppress).
    suppress_only: clamp g ≤ 0 so the gain lies in (0, 1] (for coeff ≥ 0)."""

    suppress_only: bool = False
    coeff: float = 1.0


def basis_specs(d_in, d_out, r, input_name="lora_Vh"):
    def frozen(*shape):
        return ParamSpec(shape, "zeros", trainable=False, as_buffer=True)
    return {"lora_U": frozen(d_out, r), "lora_S": frozen(r), input_name: frozen(r, d_in)}


@torch.no_grad()
def init_basis(a):
    """Plain top-r SVD of W into lora_U / lora_S / lora_Vh (rounded to the adapter dtype by copy_)."""
    cfg = a.cfg
    U, S, Vh = top_r_svd(a.base.weight, cfg.r, cfg.svd, cfg.niter)
    a.lora_U.copy_(U)
    a.lora_S.copy_(S)
    a.lora_Vh.copy_(Vh)


def basis_delta(a, input_name="lora_Vh"):
    """U diag(S) Vh (or U diag(S) P) in fp32: what the runtime subtracts from W."""
    return (a.lora_U.float() * a.lora_S.float()) @ getattr(a, input_name).float()


def basis_macs(d_in, d_out, cfg):
    """Per-token MACs of x → (x Vhᵀ) ⊙ s → · Uᵀ; r-sized per-call work (S ⊙ gain, rotating Vh) is not per token."""
    return cfg.r * d_in + cfg.r + cfg.r * d_out


def gain(a):
    """(r,) factor 1 + ELU(coeff·g): e^z for z ≤ 0, 1 + z above, C¹, always > 0, exactly 1 at g = 0.
    (A linear 1 + z flips sign below −1, exp blows up, tanh needs an arbitrary bound.)"""
    return 1.0 + gain_excess(a)


def gain_excess(a):
    """gain − 1 = ELU(coeff·g), computed directly (1 + ELU − 1 would cancel small changes)."""
    cfg, g = a.cfg, a.lora_g
    if cfg.suppress_only:
        g = g.clamp(max=0.0)
    return F.elu(cfg.coeff * g)


def gain_forward(a, x, y, input_name="lora_Vh"):
    """y + ((x Vhᵀ) ⊙ S ⊙ gain) Uᵀ: (..., d_in) -> (..., r) -> (..., d_out)."""
    h = F.linear(x, getattr(a, input_name)) * (a.lora_S * gain(a))
    return y + F.linear(h, a.lora_U)


def gain_delta_weight(a, input_name="lora_Vh"):
    """U diag(S ⊙ gain) Vh: the dense path that gain_forward adds on top of W_res."""
    s_eff = a.lora_S.float() * gain(a).float()
    return (a.lora_U.float() * s_eff) @ getattr(a, input_name).float()


def core_lora_factors(a, core_change, input_name="lora_Vh"):
    """Export form of W_res + U C P − W = U (C − diag S) P for an (r, r) core change C − diag S.

    Rank r against the original W: A = P (r, d_in), B = U (C − diag S) (d_out, r), scale 1.
    """
    return getattr(a, input_name).float(), a.lora_U.float() @ core_change.float(), 1.0


def gain_lora_factors(a, input_name="lora_Vh"):
    """The gain family: U diag(S ⊙ (gain − 1)) P, a diagonal core change."""
    s_change = a.lora_S.float() * gain_excess(a).float()
    return getattr(a, input_name).float(), a.lora_U.float() * s_change, 1.0
