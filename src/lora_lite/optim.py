"""LoRA+: Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354.

With one learning rate for both factors, B (d_out, r) learns too slowly in wide layers: the paper shows that
efficient feature learning needs η_B / η_A to grow with the width, and uses η_B = ratio · η_A with ratio = 2⁴ = 16
in practice. LoRA+ is an optimizer setting, not a method, so it is a helper that builds parameter groups for
any torch optimizer:

    opt = torch.optim.AdamW(ll.lora_plus_groups(model, lr=2e-4, ratio=16), weight_decay=0.0)

A trainable adapter tensor joins the fast group (lr · ratio) when it is `lora_B` or one-dimensional (DoRA's
magnitude, DeLoRA's λ), the rule of the paper's reference code and of PEFT's create_loraplus_optimizer; every
other one gets lr. Adapters that train no B (HRA, IA3, RoAd, LoRA-XS) are refused. tests/test_lora_family.py checks that both give every
tensor the same learning rate.
"""

from __future__ import annotations

from torch import nn

from .errors import AttachStateError, ConfigError
from .runtime import iter_adapters, resolve_name


def lora_plus_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float | None = None,
                     name: str | None = None) -> list[dict]:
    """Optimizer parameter groups for adapter `name` (None: every adapter on the model): [{"params", "lr"}, ...]
    with lr for A-side tensors and lr·ratio for B and 1-D ones. weight_decay, when given, goes into both groups;
    otherwise the optimizer's own default applies."""
    if not (lr > 0 and ratio > 0):
        raise ConfigError(f"lora_plus_groups: lr={lr} and ratio={ratio} must be > 0 (the paper uses ratio=16)")
    if name is not None:
        resolve_name(model, name, "lora_plus_groups()")
    adapters = [a for a in iter_adapters(model) if name in (None, a.name)]
    if not adapters:
        raise AttachStateError("lora_plus_groups found no adapter on this model; attach or load one first")
    slow, fast, without_b, seen = [], [], set(), set()
    for a in adapters:
        tensors = {tname: getattr(a, tname) for tname in a.tensor_names}
        trained = {n: t for n, t in tensors.items() if isinstance(t, nn.Parameter) and t.requires_grad}
        if "lora_B" not in trained:  # HRA, IA3, RoAd; LoRA-XS, whose B is frozen
            without_b.add(a.variant.name)
        for tname, t in trained.items():
            if id(t) not in seen:  # a Parameter several layers share (Lily) goes into one group, once
                seen.add(id(t))
                (fast if tname == "lora_B" or t.ndim == 1 else slow).append(t)
    if without_b:
        raise ConfigError(f"lora_plus_groups: LoRA+ speeds up the B factor, but {sorted(without_b)} train no "
                          "lora_B; use one learning rate for them (or pass name= to pick an adapter that has B)")
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [{"params": slow, "lr": lr, **extra}, {"params": fast, "lr": lr * ratio, **extra}]
    return [g for g in groups if g["params"]]
