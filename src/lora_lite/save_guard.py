"""`model.save_pretrained()` on an adapted model is refused, with the calls that do what was meant.

A Hugging Face model's own save_pretrained writes its state dict: the base weights (W_res = W - ΔW in place of W
for the methods that rewrite W, e.g. PiSSA) plus the `lora_*` tensors, which from_pretrained then drops as
"unexpected keys". The reloaded model is the base, or for PiSSA neither the base nor the adapted model, and
nothing says so. So attach shadows `save_pretrained` on the model it was called on (when its class has one:
transformers, diffusers) with `RefusingSavePretrained`, which raises AttachStateError naming the right calls.
That covers push_to_hub and a plain transformers Trainer's checkpoints, which go through save_pretrained.

The guard is an instance attribute, so deepcopy, pickle and torch.save(model) carry it; detach removes it once
the model holds no adapter, and it checks for adapters on every call, so a model whose adapters were removed some
other way saves normally. Duck-typed: this module never imports transformers.
"""

from __future__ import annotations

from torch import nn

from .errors import AttachStateError

ATTR = "save_pretrained"


class RefusingSavePretrained:
    """Stands in for `model.save_pretrained` while `model` carries adapters."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        from .runtime import iter_adapters  # runtime imports this module

        adapters = iter_adapters(self.model)
        if adapters:
            raise AttachStateError(refusal(self.model, adapters, kwargs.get("save_directory", args[0] if args else None)))
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def refusal(model: nn.Module, adapters, directory) -> str:
    from .variant import rewrites_weight

    where = repr(str(directory)) if directory is not None else "out_dir"
    rewriting = sorted({a.variant.name for a in adapters if rewrites_weight(a.variant)})
    residual = (f", with W_res = W - ΔW of {', '.join(rewriting)} in place of the original W," if rewriting else "")
    return (f"{type(model).__name__}.save_pretrained() would write the base weights{residual} plus the lora-lite "
            "tensors, which from_pretrained() drops as unexpected keys: the adapter would be lost without an error. "
            f"Write the adapter with lora_lite.hf.save_pretrained(model, {where}) and rebuild the adapted model with "
            f"lora_lite.hf.from_pretrained(<base model id>, {where}); or call lora_lite.merge(model) first to save a "
            "standalone merged model. Under transformers' Trainer use lora_lite.hf.Trainer, or add the "
            "lora_lite.hf.AdapterCheckpoints mixin to SFTTrainer / DPOTrainer")


def guard(model: nn.Module) -> None:
    """Shadow `model.save_pretrained` (a no-op for classes without one, or a model already guarded)."""
    if callable(getattr(type(model), ATTR, None)) and not isinstance(model.__dict__.get(ATTR), RefusingSavePretrained):
        model.__dict__[ATTR] = RefusingSavePretrained(model)


def unguard(model: nn.Module) -> None:
    """Remove the guard from `model` and its sub-modules wherever no adapter is left below it."""
    from .runtime import iter_adapters

    for module in model.modules():
        if isinstance(module.__dict__.get(ATTR), RefusingSavePretrained) and not iter_adapters(module):
            del module.__dict__[ATTR]
