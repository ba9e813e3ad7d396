"""Activation (gradient) checkpointing, reentrant and not, gives every registered method the gradients it gets
without it, bit for bit: the hooks run again in the recomputed forward and see the same tensors."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import ids, perturb
from lora_lite.runtime import iter_adapters
from variant_cases import attach_case

MODES = {"non-reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


def gradients(model) -> dict[str, torch.Tensor]:
    x = ids()
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_checkpointing_gives_the_same_gradients(name):
    model = fresh_model("qwen")
    torch.manual_seed(0)  # the method's random init does not depend on earlier tests
    attach_case(model, name, "qwen")
    perturb(model)  # every trainable tensor then gets a gradient (LoRA's A does not while B = 0)
    model.train()
    plain = gradients(model)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    for mode, kwargs in MODES.items():
        checkpointed = copy.deepcopy(model)
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        # the first adapted layer starts twice per step (forward, then the recompute in backward): proof that
        # checkpointing is in effect, not silently off. Counted ahead of the adapter's own hooks, since
        # non-reentrant recomputation stops as soon as it has rebuilt what backward needs.
        layer = iter_adapters(checkpointed)[0].base
        calls = []
        handle = layer.register_forward_pre_hook(lambda *_, sink=calls: sink.append(1), prepend=True)
        got = gradients(checkpointed)
        handle.remove()
        assert len(calls) == 2, f"{mode}: the layer ran {len(calls)} times"
        assert got.keys() == plain.keys()
        differ = [n for n in plain if not torch.equal(got[n], plain[n])]
        assert not differ, f"{name} {mode}: gradients differ for {differ[:3]}"
