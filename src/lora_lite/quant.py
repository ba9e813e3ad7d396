"""Reading the weight of a quantized layer, for the few hook-only variants that need W's values.

bitsandbytes stores W as packed 4-bit codes (`Params4bit`, with a `quant_state` holding the block scales)
or as int8 rows (`Int8Params`: W ≈ CB · SCB / 127 per output row). `dense_weight` returns the dense
(d_out, d_in) matrix the layer actually multiplies by, so an init such as DeLoRA's column norms sees the
weights the forward uses, also after bitsandbytes repacked a 4-bit weight for its CPU kernel.
bitsandbytes is imported lazily: the core library never needs it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UnsupportedLayerError


def is_quantized(layer: nn.Module) -> bool:
    return not layer.weight.dtype.is_floating_point


@torch.no_grad()
def dense_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (d_out, d_in) weight as a new dense tensor of `dtype`; never a view of the stored one."""
    w = layer.weight
    kind = type(w).__name__
    if w.dtype.is_floating_point:
        return w.detach().to(dtype, copy=True)
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_f

        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bnb >= 0.49 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval, no-grad forward;
            # unpack a copy (the inverse edits the state in place) so the layer keeps working as it is.
            data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb_f.dequantize_4bit(data, state).to(dtype)
    if kind == "Int8Params":
        # the first forward moves CB and SCB from the weight to the layer's MatmulLtState (init_8bit_state)
        state = getattr(layer, "state", None)
        scales = w.SCB if w.SCB is not None else getattr(state, "SCB", None)
        codes = w.CB if w.CB is not None else getattr(state, "CB", None)
        codes = w.data if codes is None else codes
        return (codes.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127)).to(dtype)
    raise UnsupportedLayerError(f"cannot read the weight of {type(layer).__name__}: its {kind} weight of dtype {w.dtype} "
                                "is not a float tensor, a bitsandbytes Params4bit or an Int8Params. Load the base "
                                "unquantized or in bitsandbytes 4/8-bit")
