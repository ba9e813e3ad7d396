"""bf16 mixed precision on an fp32 model, for every registered method: torch.autocast, and accelerate's
mixed_precision="bf16" (which wraps the forward in autocast). The hooks compute in the activation dtype and the
fp32 adapter tensors receive fp32 gradients; the loss stays at bf16 rounding of the fp32 loss; a step changes the
adapter and leaves the base bit-identical."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import ids, perturb
from lora_lite.variant import rewrites_weight
from variant_cases import CASES, attach_case

LOSS_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa; the tiny Qwen's loss moves ~1e-3 relative under it


def adapted(name: str):
    model = fresh_model("qwen")
    torch.manual_seed(0)  # the method's random init does not depend on earlier tests
    attach_case(model, name, "qwen")
    perturb(model)
    return model.train()


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def check_step(model, optimizer, backward, fp32_loss, loss):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    base, before = frozen_state(model), {n: p.detach().clone() for n, p in params.items()}
    assert torch.isfinite(loss) and abs(loss.item() - fp32_loss) <= LOSS_RTOL * fp32_loss
    backward(loss)
    for n, p in params.items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in params.items())
    after = frozen_state(model)
    assert all(torch.equal(after[k], v) for k, v in base.items())


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_autocast_bf16_trains_fp32_adapter_tensors(name):
    model, x = adapted(name), ids()
    with torch.no_grad():
        fp32_loss = loss_of(model, x).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CASES[name].lr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=x).logits
        loss = loss_of(model, x)
    assert logits.dtype == torch.bfloat16  # autocast really ran the forward in bf16
    check_step(model, optimizer, lambda t: t.backward(), fp32_loss, loss)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a bf16 Accelerator would leak its precision into later tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_accelerate_bf16_trains_fp32_adapter_tensors(name, fresh_accelerate_state):
    model, x = adapted(name), ids()
    with torch.no_grad():
        fp32_loss = loss_of(model, x).item()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CASES[name].lr)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    check_step(model, optimizer, accelerator.backward, fp32_loss, loss_of(prepared, x))


@pytest.mark.parametrize("name", [n for n in sorted(ll.REGISTRY) if rewrites_weight(ll.REGISTRY[n])])
def test_disabled_inside_autocast_rebuilds_the_exact_residual(name):
    """A `with ll.disabled(model)` block inside autocast (a DPO / KL reference pass under bf16) puts W back and
    rebuilds W_res on exit; base_delta must be computed in fp32 there, or W_res drifts by bf16 rounding."""
    model = adapted(name)
    before = frozen_state(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), ll.disabled(model):
        model(input_ids=ids())
    after = frozen_state(model)
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []
