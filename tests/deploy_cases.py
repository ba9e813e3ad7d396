"""Helpers shared by the deployment tests (merge, disabled, PEFT export/import) and the merged == hooked column
of the invariant matrix. Variants are configured by tests/variant_cases.py CASES, as everywhere else.

`trained(...)` stands in for a trained adapter: every trainable lora_* tensor gets seeded noise, so merged
weights, exports and disabled() are checked on an adapter that clearly changes the outputs.
"""

from __future__ import annotations

import torch

import lora_lite as ll
from conftest import fresh_model
from lora_lite.runtime import iter_adapters
from variant_cases import CASES, attach_case


def exportable(name: str) -> bool:
    """Its change against the original W is exactly low-rank: it defines lora_factors."""
    return hasattr(ll.REGISTRY[name], "lora_factors")


@torch.no_grad()
def perturb(model, seed=0, std=0.1, adapter=None):
    """Add seeded noise to every trainable lora_* tensor (of one named adapter, or of all), and set the frozen
    state training advances to its trained value (Case.trained_state)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name and (adapter is None or f".lora_adapters.{adapter}." in name):
            p.add_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
    for a in iter_adapters(model):
        if adapter in (None, a.name):
            for tname, value in CASES[a.variant.name].trained_state.items():
                getattr(a, tname).fill_(value)


def trained(name: str, dtype=torch.float32, kind="qwen", seed=0, cfg=None):
    model = fresh_model(kind, dtype)
    attach_case(model, name, kind, cfg=cfg)
    perturb(model, seed)
    return model


def ids(n=3, t=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits.float()


def rel_err(a, b) -> float:
    """max |a − b| / max |b|: the error relative to the output's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()
