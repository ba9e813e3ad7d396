"""add_weighted: a new adapter whose weight change is exactly a weighted sum of other adapters' changes.

For adapters whose change against the original weight is low-rank (methods with `lora_factors`: ΔW_i =
s_i·B_i A_i), the new adapter is a plain `lora` one with, on every layer any of them adapts,
    ΔW = Σ_i w_i · ΔW_i
built three ways:
    "cat"     A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]: exact, rank Σ r_i
    "svd"     the top-r SVD of the dense Σ w_i ΔW_i (r defaults to the largest r_i): the best rank-r
              approximation, exact whenever the sum has rank ≤ r
    "linear"  rank r, mixing the factors themselves: exact only when the adapters share A (B = Σ w_i s_i B_i) or
              share B; otherwise refused, because mixing both factors adds cross terms w_i w_j B_i A_j (the bug
              PEFT's "linear" combination has had)
Layers where only some adapters sit use the ones present; ranks are padded with zero rows to one r.
The new adapter starts active like any attached one; `ll.set_active(model, name)` makes it the only one.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import ConfigError, ConversionError
from .io import attach_entries
from .runtime import adapter_extras, adapters_by_name, check_new_name
from .svd import top_r_svd
from .variants.lora import LoRAConfig

HOWS = ("linear", "cat", "svd")


@torch.no_grad()
def add_weighted(model: nn.Module, weights: dict[str, float], name: str, how: str = "cat",
                 r: int | None = None) -> str:
    """Attach adapter `name` with ΔW = Σ weights[a]·ΔW_a on every layer the named adapters adapt."""
    if how not in HOWS:
        raise ConfigError(f"add_weighted: how={how!r} is not one of {HOWS}")
    groups = adapters_by_name(model)
    if not weights or set(weights) - set(groups):
        raise ConfigError(f"add_weighted: weights must name attached adapters; got {sorted(weights)}, attached: "
                          f"{list(groups)}")
    check_new_name(model, name)
    for n in weights:
        if not hasattr(groups[n][0].variant, "lora_factors"):
            raise ConversionError(f"add_weighted: {n!r} ({groups[n][0].variant.name}) has no low-rank form "
                                  "(lora_factors), so its change cannot be added as a LoRA; merge it instead")
        if any(a.kind == "experts" for a in groups[n]) or adapter_extras(model, n):
            raise ConversionError(f"add_weighted: {n!r} adapts expert parameters / trains whole modules or token "
                                  "rows, which have no single low-rank ΔW per layer to combine; combine the other "
                                  "adapters, or merge")
    per_layer: dict[nn.Module, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for n, w in weights.items():
        for a in groups[n]:
            A, B, s = a.variant.lora_factors(a)
            per_layer.setdefault(a.base, []).append((float(w), A.float(), B.float() * float(s)))
    factors = {layer: _combine(terms, how, r, max(A.shape[0] for _, A, _ in terms)) for layer, terms in per_layer.items()}
    rank = r if how == "svd" and r is not None else max(A.shape[0] for A, _ in factors.values())
    names = {id(m): n for n, m in model.named_modules()}
    tensors, targets = {}, []
    for layer, (A, B) in factors.items():
        lname = names[id(layer)]
        pad = rank - A.shape[0]
        tensors[f"{lname}.lora_A"] = torch.cat([A, A.new_zeros(pad, A.shape[1])]).cpu()
        tensors[f"{lname}.lora_B"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1).cpu()
        targets.append(lname)
    cfg = LoRAConfig(r=rank, alpha=float(rank), target_names=tuple(f"^{re.escape(t)}$" for t in targets))
    attach_entries(model, {name: (cfg, targets, tensors, {})}, source=f"add_weighted({sorted(weights)})")
    return name


def _combine(terms, how: str, r: int | None, widest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A = Σ w·B_i A_i for one layer's (w, A_i, s_i·B_i) terms."""
    if how == "cat":
        return torch.cat([A for _, A, _ in terms]), torch.cat([w * B for w, _, B in terms], dim=1)
    if how == "svd":
        delta = sum(w * B @ A for w, A, B in terms)
        U, S, Vh = top_r_svd(delta, min(r or widest, *delta.shape), "full")
        root = S.sqrt()
        return root[:, None] * Vh, U * root
    A0, B0 = terms[0][1], terms[0][2]
    if all(A.shape == A0.shape and torch.equal(A, A0) for _, A, _ in terms):
        return A0, sum(w * B for w, _, B in terms)
    if all(B.shape == B0.shape and torch.equal(B, B0) for _, _, B in terms):
        return sum(w * A for w, A, _ in terms), B0
    raise ConversionError("add_weighted(how='linear') is exact only when the adapters share their A factors (or "
                          "their B factors); these do not, and mixing both factors would add cross terms "
                          "w_i·w_j·B_i A_j. Use how='cat' (exact, rank Σ r_i) or how='svd' (rank r, the best "
                          "approximation)")
