"""torch.compile: every registered method's training forward is one graph with no break
(torch._dynamo.explain), and compiled training equals eager for one method of each way a method enters the forward.

Cost, measured on 2 shared CPU cores: explain is ~2-5 s per method on a one-layer tiny Qwen, a full fwd+bwd compile
~15-20 s. So every method gets explain and the full compile runs for the representatives below. The full compile
uses the aot_eager backend: Dynamo and AOTAutograd (the graph capture and the joint forward/backward graph, where
hooks could break or change the math) without inductor's C++ code generation, which costs minutes on a CPU and
only turns the same graph into kernels; with it, results match eager to rounding, not bitwise.
"""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import make_tiny_qwen
from deploy_cases import ids, perturb
from lora_lite.variant import rewrites_weight
from variant_cases import attach_case

# One method per way into the forward, picked from registered facts (the first registered name of each kind).
KINDS = {
    "output hook, hook-only": lambda v: not hasattr(v, "forward_input") and not getattr(v, "needs_dense_weight", False),
    "input hook": lambda v: hasattr(v, "forward_input"),
    "reads the dense W": lambda v: getattr(v, "needs_dense_weight", False) and not rewrites_weight(v),
    "rewrites W": rewrites_weight,
}
REPRESENTATIVES = {kind: next(n for n in sorted(ll.REGISTRY) if fits(ll.REGISTRY[n])) for kind, fits in KINDS.items()}


def adapted(name: str):
    model = make_tiny_qwen(layers=1)
    torch.manual_seed(0)  # the method's random init does not depend on earlier tests
    attach_case(model, name, "qwen")
    perturb(model)
    return model.train()


def graphs(model):
    torch._dynamo.reset()
    x = ids()
    explained = torch._dynamo.explain(model)(input_ids=x, labels=x, use_cache=False)
    return explained.graph_count, explained.graph_break_count, [str(b.reason) for b in explained.break_reasons]


def test_the_base_model_alone_is_one_graph():
    """So that a break in the tests below is the adapter's."""
    assert graphs(make_tiny_qwen(layers=1).train())[:2] == (1, 0)


@pytest.mark.parametrize("name", sorted(ll.REGISTRY))
def test_training_forward_is_one_graph_without_breaks(name):
    count, breaks, reasons = graphs(adapted(name))
    assert (count, breaks) == (1, 0), f"{name}: {count} graphs, {breaks} breaks: {reasons[:3]}"


def step(forward, model, x):
    """One training step's loss and gradients, running `forward` (the model, or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    loss = forward(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(set(REPRESENTATIVES.values())))
def test_compiled_training_and_disabled_equal_eager(name):
    torch._dynamo.reset()
    model, x = adapted(name), ids()
    eager_loss, eager_grads = step(model, model, x)
    with torch.no_grad(), ll.disabled(model):
        eager_base = model(input_ids=x, use_cache=False).logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = step(compiled, model, x)
    assert torch.equal(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and all(torch.equal(grads[n], eager_grads[n]) for n in grads)
    with torch.no_grad(), ll.disabled(model):  # adapters off: Dynamo's guards on them recompile, never reuse
        assert torch.equal(compiled(input_ids=x, use_cache=False).logits, eager_base)
