"""Configs and helpers shared by the deployment tests (merge, disabled, PEFT export/import, bitsandbytes).

`trained(...)` stands in for a trained adapter: every trainable lora_* tensor gets seeded noise, so merged
weights, exports and disabled() are checked on an adapter that actually changes the outputs.
"""

from __future__ import annotations

import torch

import lora_lite as ll
from conftest import fresh_model

# Tiny Qwen dims are 64 (q, o), 32 (k, v), 128 (gate, up, down's d_in): RoAd groups of 8 divide all of them.
CONFIGS = {
    "lora": lambda: ll.LoRAConfig(r=4, alpha=8),
    "pissa": lambda: ll.PiSSAConfig(r=4, alpha=8),
    "dora": lambda: ll.DoRAConfig(r=4, alpha=8),
    "delora": lambda: ll.DeLoRAConfig(r=4, lambda0=1.0),
    "ia3": lambda: ll.IA3Config(),
    "ia3_ff": lambda: ll.IA3FFConfig(),
    "hra": lambda: ll.HRAConfig(r=4),
    "road": lambda: ll.RoadConfig(group_size=8),
    "road_4": lambda: ll.RoadConfig(road_variant="road_4", group_size=8),
}
EXPORTABLE = ("lora", "pissa", "delora", "hra")
NOT_EXPORTABLE = ("dora", "ia3", "ia3_ff", "road")


@torch.no_grad()
def perturb(model, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            p.add_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


def trained(case: str, dtype=torch.float32, seed=0):
    model = fresh_model("qwen", dtype)
    ll.attach(model, CONFIGS[case]())
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
