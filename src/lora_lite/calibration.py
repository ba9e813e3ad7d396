"""Calibration passes for data-driven inits: input second moments (eva, antipasto_corda, antipasto_asvd) and
weight gradients (lora_ga, lora_one).

`calibration_data` is an iterable of whole-model inputs: a dict is called as model(**batch), a tuple/list as
model(*batch), anything else as model(batch). The pass runs in eval mode under no_grad, with the adapter
hooks already live (the runtime registers them before group_init), so each layer sees the activations that
training will see. Padding is left out: when a dict batch carries `attention_mask`, only the positions
where it is nonzero count. The capture hooks are removed and every module's train/eval flag restored in a
`finally`, so a failing batch leaves nothing behind.

Only second moments are kept, never the tokens: per target C = Σ x xᵀ / n, (d_in, d_in) in fp32 on CPU
(or just its diagonal). Moments that are not finite (NaN/inf inputs, or inputs whose squares overflow fp32)
are refused with a CalibrationError before any method decomposes them, and so are gradients that are not
(weight_gradients). That is all the variants need: EVA's top right singular vectors of X are C's top
eigenvectors, CorDA whitens with C, ASVD with diag(C). The product x xᵀ is formed on the activation's device
and then moved to CPU, and layers that read the same tensor (q/k/v, gate/up) share one product.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import CalibrationError


def call_model(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def input_moments(model: nn.Module, layers: list[nn.Module], data: Iterable | None, *, min_tokens: int,
                  variant: str, diagonal: bool = False) -> list[torch.Tensor]:
    """Per layer (in order), C = E[x xᵀ] (fp32, CPU) over the non-padding calibration tokens of its input.

    diagonal=True keeps only diag(C) = E[x²] (d_in,), for statistics that need no cross terms (ASVD).
    """
    if data is None:
        raise CalibrationError(f"{variant} initialises from data but got calibration_data=None; pass "
                               "calibration_data=[batch, ...] (model inputs, e.g. dicts with input_ids and "
                               "attention_mask) to attach()")
    names = {id(m): n for n, m in model.named_modules()}
    shape = (lambda d: (d,)) if diagonal else (lambda d: (d, d))
    grams = [torch.zeros(shape(int(layer.in_features))) for layer in layers]
    counts = [0] * len(layers)
    step = {"mask": None, "x": None, "gram": None}  # current batch's mask; last input and its product

    def make_hook(i, name):
        def hook(module, args):
            x = args[0]
            if step["x"] is not x:  # q/k/v (and gate/up) are called one after another on the same tensor
                step["x"], step["gram"] = x, _gram(x, step["mask"], name, diagonal)
            gram, n = step["gram"]
            grams[i].add_(gram)
            counts[i] += n
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [layer.register_forward_pre_hook(make_hook(i, names.get(id(layer), "?")))
               for i, layer in enumerate(layers)]
    try:
        model.eval()
        with torch.no_grad():
            for batch in data:
                step["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                call_model(model, batch)
                step["x"] = step["gram"] = None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    for layer, n in zip(layers, counts, strict=True):
        if n < min_tokens:
            raise CalibrationError(f"{variant}: layer {names.get(id(layer), '?')!r} saw {n} non-padding calibration "
                                   f"tokens, fewer than r={min_tokens}; pass more or longer calibration batches, or lower r")
    moments = [g / n for g, n in zip(grams, counts, strict=True)]
    for layer, C in zip(layers, moments, strict=True):
        if not torch.isfinite(C).all():  # an eigh or SVD of it would fail or fill the adapter with NaN
            raise CalibrationError(f"{variant}: the calibration inputs of layer {names.get(id(layer), '?')!r} hold "
                                   "NaN/inf, or values too large for fp32 second moments (|x| above ~1e19); check "
                                   "the calibration batches and the model's activations on them")
    return moments


def weight_gradients(model: nn.Module, layers: list[nn.Module], data: Iterable | None, *, min_tokens: int,
                     variant: str) -> list[torch.Tensor]:
    """Per layer (in order), the mean over calibration batches of ∂loss/∂W, fp32, on W's device: the gradient
    full fine-tuning would take first (PEFT's preprocess_loraga computes the same mean).

    The loss is the model's own: `output.loss` (Hugging Face models return it when the batch has `labels`), or
    the output itself when that is a scalar tensor. Runs in eval mode (no dropout, so the init is
    reproducible); only the target weights require grad meanwhile, and torch.autograd.grad leaves every `.grad`
    untouched. requires_grad and train/eval flags are restored in a `finally`. A layer's gradient has rank at
    most the number of tokens it saw, so fewer than `min_tokens` non-padding tokens raise.
    """
    if data is None:
        raise CalibrationError(f"{variant} initialises from gradients but got calibration_data=None; pass "
                               "calibration_data=[batch, ...] whose batches give a loss (e.g. dicts with input_ids, "
                               "attention_mask and labels) to attach()")
    names = {id(m): n for n, m in model.named_modules()}
    weights = [layer.weight for layer in layers]
    flags = [w.requires_grad for w in weights]
    modes = [(m, m.training) for m in model.modules()]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    counts, batches = [0] * len(layers), 0
    mask = {"now": None}

    def make_hook(i, name):
        def hook(module, args):
            counts[i] += _token_count(args[0], mask["now"], name)
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i, names.get(id(layer), "?")))
               for i, layer in enumerate(layers)]
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        for batch in data:
            mask["now"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            with torch.enable_grad():
                grads = torch.autograd.grad(_loss(call_model(model, batch), variant), weights, allow_unused=True)
            for layer, total, g in zip(layers, sums, grads, strict=True):
                if g is None:
                    raise CalibrationError(f"{variant}: layer {names.get(id(layer), '?')!r} got no gradient from "
                                           "the calibration loss; it is not on the loss's path, so exclude it")
                total.add_(g.float())
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    for layer, n in zip(layers, counts, strict=True):
        if n < min_tokens:
            raise CalibrationError(f"{variant}: layer {names.get(id(layer), '?')!r} saw {n} non-padding calibration "
                                   f"tokens, fewer than the {min_tokens} singular vectors its init takes from the "
                                   "gradient; pass more or longer calibration batches, or lower r")
    means = [total / batches for total in sums]
    for layer, G in zip(layers, means, strict=True):
        if not torch.isfinite(G).all():  # its SVD would fail or fill the adapter with NaN
            raise CalibrationError(f"{variant}: the calibration gradient of layer {names.get(id(layer), '?')!r} holds "
                                   "NaN/inf, or values too large for fp32 (from NaN/inf inputs or a loss that "
                                   "overflows); check the calibration batches and the model's loss on them")
    return means


def _loss(output, variant: str) -> torch.Tensor:
    loss = output if isinstance(output, torch.Tensor) else getattr(output, "loss", None)
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad):
        raise CalibrationError(f"{variant} needs a loss from each calibration batch, but the model returned "
                               f"{type(output).__name__} without a differentiable scalar loss. Add labels to the "
                               "batches (for a causal LM: labels = input_ids with -100 on padding), or pass batches "
                               "for which the model returns its loss")
    return loss


def _token_count(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> int:
    """The non-padding rows of a layer input (batch, seq, d_in); the mask must cover them."""
    rows = x.numel() // x.shape[-1]
    if mask is None:
        return rows
    if mask.numel() != rows:
        raise CalibrationError(f"layer {name!r} got an input of shape {tuple(x.shape)} but the batch's "
                               f"attention_mask has shape {tuple(mask.shape)}; masking needs inputs shaped "
                               "(batch, seq, d_in). Drop attention_mask from unpadded batches")
    return int((mask != 0).sum())


def _gram(x: torch.Tensor, mask: torch.Tensor | None, name: str, diagonal: bool) -> tuple[torch.Tensor, int]:
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    if mask is not None:
        _token_count(x, mask, name)  # the mask must fit the input
        rows = rows[mask.reshape(-1).to(rows.device) != 0]
    gram = rows.square().sum(0) if diagonal else rows.T @ rows
    return gram.cpu(), rows.shape[0]
