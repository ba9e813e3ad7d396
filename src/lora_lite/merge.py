"""merge: fold adapters into the base weights, as a transaction.

merge(model, name) asks the method for each adapted layer's merged weight and bias, computed in fp32 from the
current dense W and rounded once to W's dtype:
    merged_weight(a, W, bias) -> (W', b')    non-additive methods (IA3, RoAd, HRA)
    W + delta_weight(a)                      additive methods (LoRA, PiSSA, DoRA, DeLoRA, ...)
A layer with several merged adapters folds them in the order its hook applies them: output-side adapters in
attach order, then input-side ones (whose product sits on the right of W) from the last attached to the first.
For PiSSA-style methods the merged weight is W_res + ΔW; an inactive one is switched on first.

The model is never left half-merged: the first pass computes every merged weight and checks it is finite
(nothing is written); the second writes layer by layer, keeping a CPU copy of each weight and bias it
overwrites, then removes the merged adapters. If anything interrupts either step (an error, Ctrl-C), every
written layer is copied back bit for bit and every removed adapter is put back in its place: the model is as
before the call. The extra memory is those CPU copies (the adapted layers' weights) and one layer's fp32
weight on the device. Adapters not merged stay attached.

Layers that are not nn.Linear merge in their kind's (d_out, d_in) view (lora_lite.layer_kinds): Wᵀ for Conv1D
and embeddings, W.flatten(1) for convs, each expert's matrix for expert parameters. Modules trained whole
(modules_to_save) keep their trained values; trained embedding rows are written into the embedding's weight.
Removing them, and the expert placeholders whose last adapter goes, is part of the same transaction: an
interrupted merge puts every one back (rows copied back into the embedding, holders, hooks and experts
forwards restored, requires_grad flags as they were).

Quantized (bitsandbytes) layers are refused: writing the merged weight back into 4/8-bit codes would
re-quantize it and change the outputs. For a QLoRA adapter: load the base unquantized, lora_lite.load the
adapter file, then merge.
"""

from __future__ import annotations

import torch
from torch import nn

from . import extras
from .errors import AttachStateError, ConversionError, UnsupportedLayerError
from .experts import HOLDER, ExpertSlice, ExpertsParameter
from .layer_kinds import KINDS
from .quant import is_quantized
from .runtime import CONTAINER, Adapter, _sync_hooks, adapters_by_name, detach, remove_adapters, set_activity
from .variant import rewrites_weight


def _additive_output(a: Adapter) -> bool:
    return not a.input_side and not hasattr(a.variant, "merged_weight")


def _merge_plan(model: nn.Module, name: str | None) -> dict[nn.Module, list[Adapter]]:
    """{layer: its adapters to merge, in the layer's attach order}, after every check that can refuse."""
    groups = adapters_by_name(model)
    if not groups:
        raise AttachStateError("merge() found no adapter on this model; attach or load one first")
    if name is not None and name not in groups:
        raise AttachStateError(f"merge(): no adapter named {name!r} on this model; attached: {list(groups)}")
    chosen = {id(a) for n, group in groups.items() if name in (None, n) for a in group}
    holders = _holders(model)
    plan: dict[nn.Module, list[Adapter]] = {}
    for group in groups.values():
        for a in group:
            if id(a) not in chosen or a.base in plan:
                continue
            on_layer = list(a.base._modules[CONTAINER].values())
            merged = [b for b in on_layer if id(b) in chosen]
            kept = [b for b in on_layer if id(b) not in chosen]
            for b in merged:
                if not (hasattr(b.variant, "merged_weight") or hasattr(b.variant, "delta_weight")):
                    raise ConversionError(f"method {b.variant.name!r} defines neither merged_weight nor delta_weight, "
                                          "so its effect is not a change of the weights; keep it attached")
            sharing = holders.get(id(a.base.weight), [])
            tied = [n for n, m in sharing if m is not a.base and m is not getattr(a.base, "owner", None)]
            if tied:
                raise AttachStateError(f"merge() would write the weight of {[n for n, m in sharing if m is a.base]}, "
                                       f"which {tied} hold too (tied weights): they would change as well. Untie "
                                       "the weights first (e.g. give the output head its own copy), or keep the "
                                       "adapter hooked")
            if is_quantized(a.base):
                raise UnsupportedLayerError(
                    f"merge() cannot write into a {type(a.base).__name__} with {a.base.weight.dtype} weights: "
                    "re-quantizing the merged weight would change the outputs. Save the adapter, load the base "
                    "unquantized, lora_lite.load the adapter there and merge that model")
            if any(rewrites_weight(b.variant) for b in kept):
                raise AttachStateError(f"merge({name!r}) would write a layer whose weight adapter "
                                       f"{next(b.name for b in kept if rewrites_weight(b.variant))!r} rewrote; merge "
                                       "that one too (merge(model)) or detach it first")
            first_merged = on_layer.index(merged[0])
            if kept and on_layer.index(kept[0]) < first_merged and not all(map(_additive_output, on_layer)):
                raise AttachStateError(f"merge({name!r}): adapter {kept[0].name!r} acts before it on a layer, and "
                                       "folding a later, non-additive adapter into W would change how they compose; "
                                       "merge both (merge(model)) or detach that one")
            plan[a.base] = merged
    return plan


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """{id(parameter): [(module name, module) holding it directly]}: more than one means tied weights."""
    out: dict[int, list] = {}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            out.setdefault(id(p), []).append((n, m))
    return out


@torch.no_grad()
def _merged(layer: nn.Module, adapters: list[Adapter]):
    """(W', b') in the layer's own layout and dtype."""
    kind = KINDS[adapters[0].kind]
    bias = getattr(layer, "bias", None)
    if isinstance(layer, ExpertsParameter):  # expert by expert, each adapter sliced to that expert
        pairs = [_merged_matrix(kind.as_2d(layer, layer.weight[e].float()), None if bias is None else bias[e].float(),
                                [ExpertSlice(a, e) for a in adapters]) for e in range(layer.num_experts)]
        W = torch.stack([kind.from_2d(layer, w) for w, _ in pairs])
        b = None if bias is None else torch.stack([b for _, b in pairs])
    else:
        W2d, b = _merged_matrix(kind.as_2d(layer, layer.weight.float()), None if bias is None else bias.float(),
                                adapters)
        W = kind.from_2d(layer, W2d)
    return W.to(layer.weight.dtype), None if b is None else b.to(bias.dtype)


def _merged_matrix(W: torch.Tensor, bias: torch.Tensor | None, adapters):
    ordered = [a for a in adapters if not a.input_side] + [a for a in reversed(adapters) if a.input_side]
    for a in ordered:
        if hasattr(a.variant, "merged_weight"):
            W, bias = a.variant.merged_weight(a, W, bias)
        else:
            W = W + a.variant.delta_weight(a)
    return W, bias


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (None: every adapter) into the base weights and remove it. Returns `model`."""
    plan = _merge_plan(model, name)
    merged = sorted((a for adapters in plan.values() for a in adapters), key=lambda a: a.order)
    activity = [(a, a.active) for a in merged]
    holders = [e for e in extras.iter_extras(model) if name in (None, e.name)]
    activity_extras = [(e, e.active) for e in holders]
    released: list[tuple[Adapter, torch.Tensor | None, bool]] = []
    containers = _containers(plan)
    extras_state = extras.snapshot(holders)
    written: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = []
    try:
        for e, _ in activity_extras:
            extras.set_activity(e, True)  # trained values of modules_to_save in place
        for a in merged:
            set_activity(a, True)  # W_res in place for weight-rewriting methods
        for layer, adapters in plan.items():
            W_new, b_new = _merged(layer, adapters)
            if not (torch.isfinite(W_new).all() and (b_new is None or torch.isfinite(b_new).all())):
                raise ConversionError(f"merging {[a.name for a in adapters]} gives non-finite weights (the adapter "
                                      f"holds inf/nan or overflows {W_new.dtype}); nothing was changed. Check the "
                                      "training run")
        with torch.no_grad():
            for layer, adapters in plan.items():
                W_new, b_new = _merged(layer, adapters)
                old_bias = None if b_new is None else layer.bias.detach().to("cpu", copy=True)
                written.append((layer, layer.weight.detach().to("cpu", copy=True), old_bias))
                layer.weight.copy_(W_new)
                if b_new is not None:
                    layer.bias.copy_(b_new)
            for rows in holders:
                if isinstance(rows, extras.TokenRows) and not rows.tied:
                    written.append((rows.base, rows.base.weight.detach().to("cpu", copy=True), None))
                    extras.merge_tokens(rows)
        released = [(a, a.original_weight, a.residual_applied) for a in merged]
        for a in merged:  # the merged weight replaces the original: nothing to restore on removal
            a.original_weight, a.residual_applied = None, False
        extras.remove(holders, keep_values=True)
        remove_adapters(merged)
    except BaseException:
        _roll_back(written, released, containers, activity)
        extras.restore(extras_state)
        for e, was_active in activity_extras:
            extras.set_activity(e, was_active)
        raise
    if not any(isinstance(m, Adapter) for m in model.modules()):
        detach(model)  # no adapter left: requires_grad flags go back to what they were before the first attach
    return model


def _containers(plan: dict[nn.Module, list[Adapter]]) -> list[tuple[nn.Module, str, nn.ModuleDict, list]]:
    """(module, attribute, ModuleDict, its entries) of every container removing the plan's adapters may change:
    each layer's lora_adapters and, for expert parameters, the experts module's lora_experts (whose placeholder
    goes away with its last adapter)."""
    out = []
    for layer in plan:
        if isinstance(layer, ExpertsParameter):
            holder = layer.owner._modules[HOLDER]
            out.append((layer.owner, HOLDER, holder, list(holder._modules.items())))
        out.append((layer, CONTAINER, layer._modules[CONTAINER], list(layer._modules[CONTAINER]._modules.items())))
    return out


@torch.no_grad()
def _roll_back(written, released, containers, activity) -> None:
    """Undo an interrupted merge: weights and biases copied back, every removed adapter back in its layer's
    container in its place (expert placeholders back on their experts module), hooks and experts forwards as
    they were, each adapter's activity and residual state as before."""
    for layer, W_old, b_old in written:
        layer.weight.copy_(W_old)
        if b_old is not None:
            layer.bias.copy_(b_old)
    for a, original_weight, residual_applied in released:
        a.original_weight, a.residual_applied = original_weight, residual_applied
    for module, key, container, items in containers:
        container._modules.clear()
        container._modules.update(items)
        module._modules[key] = container
    for module, key, _, _ in containers:
        if key == CONTAINER:
            _sync_hooks(module)
    for a, was_active in activity:
        set_activity(a, was_active)
