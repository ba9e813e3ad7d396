"""merge / disabled: fold the adapter into the weights, or switch it off for a reference forward.

merge(model) asks the variant for each adapted layer's merged weight and bias, computed in fp32 from the
current dense W and rounded once to W's dtype:
    merged_weight(layer, W, bias) -> (W', b')    non-additive variants (IA3, RoAd, HRA)
    W + delta_weight(layer)                      additive variants (LoRA, PiSSA, DoRA, DeLoRA, ...)
It runs two passes so the model is never half-merged: the first computes every merged weight and checks it
is finite (nothing is written), the second recomputes one layer at a time and writes it, so the extra
memory is one layer's weight. Then the adapter is removed (hooks, lora_* tensors, attributes) and the model
is a plain one holding the merged weights. For PiSSA-style variants the merged weight is W_res + ΔW.

Quantized (bitsandbytes) layers are refused: writing the merged weight back into 4/8-bit codes would
re-quantize it and change the outputs. For a QLoRA adapter: load the base unquantized, lora_lite.load the
adapter file, then merge.

disabled(model) is a context manager for a reference forward (DPO, KL): every hook passes its input
through, and layers whose W the adapter rewrote (PiSSA) get the original W back for the duration. On exit,
also on an exception, the adapted weights are copied back bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import AttachStateError, ConversionError, UnsupportedLayerError
from .quant import is_quantized
from .runtime import _rollback, get_state


def _require_state(model, what):
    state = get_state(model)
    if state is None:
        raise AttachStateError(f"{what} found no adapter on this model; attach or load one first")
    if state.disabled:
        raise AttachStateError(f"{what} was called inside `with lora_lite.disabled(model)`; leave the block first")
    return state


@torch.no_grad()
def _merged(layer, variant):
    W = layer.weight.float()
    bias = None if getattr(layer, "bias", None) is None else layer.bias.float()
    if hasattr(variant, "merged_weight"):
        W_new, b_new = variant.merged_weight(layer, W, bias)
    else:
        W_new, b_new = W + variant.delta_weight(layer), bias
    return W_new.to(layer.weight.dtype), None if b_new is None else b_new.to(layer.bias.dtype)


def merge(model: nn.Module) -> nn.Module:
    """Fold the attached adapter into the base weights and remove it. Returns `model` (changed in place)."""
    state = _require_state(model, "merge()")
    variant, name = state.variant, state.cfg.variant
    if not (hasattr(variant, "merged_weight") or hasattr(variant, "delta_weight")):
        raise ConversionError(f"variant {name!r} defines neither merged_weight nor delta_weight, so its effect is "
                              "not a change of the weights and it cannot be merged; keep it attached")
    for lname, layer in state.layers.items():
        if is_quantized(layer):
            raise UnsupportedLayerError(
                f"merge() cannot write into {lname!r}, a {type(layer).__name__} with {layer.weight.dtype} weights: "
                "re-quantizing the merged weight would change the outputs. Save the adapter, load the base "
                "unquantized, lora_lite.load the adapter there and merge that model")
    for lname, layer in state.layers.items():
        W_new, b_new = _merged(layer, variant)
        if not (torch.isfinite(W_new).all() and (b_new is None or torch.isfinite(b_new).all())):
            raise ConversionError(f"merging {lname!r} gives non-finite weights (the adapter holds inf/nan or "
                                  f"overflows {W_new.dtype}); nothing was changed. Check the training run")
    with torch.no_grad():
        for layer in state.layers.values():
            W_new, b_new = _merged(layer, variant)
            layer.__dict__.pop("_lora_base_weight", None)  # the merged weight replaces the snapshot
            layer.weight.copy_(W_new)
            if b_new is not None:
                layer.bias.copy_(b_new)
    _rollback(model)
    return model


@contextmanager
def disabled(model: nn.Module):
    """`with lora_lite.disabled(model):` the exact base model inside, the adapted one again after."""
    state = get_state(model)
    if state is None:
        raise AttachStateError("disabled() found no adapter on this model; attach or load one first")
    if state.disabled:  # nested: the outer block restores
        yield model
        return
    adapted = {}
    try:
        with torch.no_grad():
            for layer in state.layers.values():
                if hasattr(layer, "_lora_base_weight"):
                    adapted[layer] = layer.weight.detach().to("cpu", copy=True)
                    layer.weight.copy_(layer._lora_base_weight)
        state.disabled = True
        yield model
    finally:
        state.disabled = False
        if get_state(model) is state:  # not detached inside the block
            with torch.no_grad():
                for layer, weight in adapted.items():
                    layer.weight.copy_(weight)
