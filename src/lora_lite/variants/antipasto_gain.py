"""AntiPaSTO (gain): wassname 2026, arXiv 2601.07473; lite port of github.com/wassname/antipasto3.

Reweight W's own top-r singular directions, nothing else:
    W = U diag(S) Vh + W_res                 top-r SVD, U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    S_eff = S ⊙ (1 + ELU(coeff·g))           g: (r,) zeros, the only trainable tensor
    y' = x W_resᵀ + ((x Vhᵀ) ⊙ S_eff) Uᵀ

The gain stays inside the interpretable singular basis (unlike the rotation of `antipasto`) and needs no
Cayley solve. suppress_only clamps g ≤ 0, so each direction can only be damped (for coeff ≥ 0); coeff is a
runtime steering knob (0 gives back W, < 0 swaps amplify and suppress).
Identity at init: g = 0 gives gain exactly 1, so y' = y up to one rounding of W_res to W's dtype.
Needs a dense nn.Linear (W is rewritten through `base_delta`). Trainable params per layer: r.
"""

from dataclasses import dataclass

from ..svd import check_svd_init
from ..variant import ParamSpec, register
from . import _svd_basis as basis


@dataclass
class AntiPaSTOGainConfig(basis.GainConfig):
    pass


@register
class AntiPaSTOGain:
    name = "antipasto_gain"
    config = AntiPaSTOGainConfig
    paper = basis.PAPER
    params_per_layer = "r"
    bench = basis.BENCH
    needs_dense_weight = True

    check = staticmethod(check_svd_init)
    init = staticmethod(basis.init_basis)
    base_delta = staticmethod(basis.basis_delta)
    added_macs = staticmethod(basis.basis_macs)
    forward = staticmethod(basis.gain_forward)
    delta_weight = staticmethod(basis.gain_delta_weight)
    lora_factors = staticmethod(basis.gain_lora_factors)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**basis.basis_specs(d_in, d_out, cfg.r), "lora_g": ParamSpec((cfg.r,), "zeros")}
