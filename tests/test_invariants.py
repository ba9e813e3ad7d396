"""The invariant matrix: every registered method x dtype (fp32, bf16) x model (tiny Qwen3 with biases, real
stories260K). How each method is configured and trained lives in tests/variant_cases.py.

Invariants (peft_anchor §6.2 items 1, 3, 9 and our own contracts):
  identity at init (fp32: 1e-5 of the logit scale; bf16: rounding level, 3x what bf16 alone does to the base);
  only lora_* tensors train and every base tensor is bit-identical after training; every trainable tensor gets
  a nonzero gradient within two steps; the loss drops; save -> load reproduces the outputs with bit-equal
  tensors; detach restores the base bit for bit and leaves no trace; merge() reproduces the hooked outputs;
  deepcopy gives an independent adapted model; pickle and torch.save(model) round-trip; model.to(dtype) and
  .half() after attach train; two named adapters on one model each give exactly their own outputs; per_row
  equals running each row alone.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import perturb
from lora_lite.runtime import adapter_layers, iter_adapters
from lora_lite.variant import couples_rows, rewrites_weight
from variant_cases import CASES, attach_case, gsm8k_batches

TRAIN_STEPS = 6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("qwen", "stories")
MATRIX = [pytest.param(name, dtype, kind, id=f"{name}-{dname}-{kind}")
          for name in sorted(CASES) for dname, dtype in DTYPES.items() for kind in KINDS]


def test_every_registered_method_is_in_the_matrix():
    assert set(CASES) == set(ll.REGISTRY)


@functools.cache
def batch(kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One fixed batch of GSM8K questions, used as input and (shifted by the model) as labels."""
    (b,) = gsm8k_batches(fresh_model(kind, dtype), n_batches=1, batch_size=4, max_length=24, split="test")
    return {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}


def logits(model, kind, dtype, rows=None) -> torch.Tensor:
    b = batch(kind, dtype)
    ids, mask = b["input_ids"], b["attention_mask"]
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def attached(name: str, kind: str, dtype: torch.dtype, adapter: str = "default", model=None, cfg=None):
    model = fresh_model(kind, dtype) if model is None else model
    attach_case(model, name, kind, adapter=adapter, cfg=cfg)
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def base_state(model) -> dict[str, torch.Tensor]:
    """Every non-adapter parameter and buffer, non-persistent ones (rotary inv_freq) included."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: v.detach().clone() for k, v in tensors.items() if "lora_" not in k}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in (dict(model.named_parameters()) | dict(model.named_buffers())).items()
            if "lora_" in k}


def train_steps(model, name, kind, dtype, steps):
    opt = CASES[name].optimizer(trainable(model).values(), lr=CASES[name].lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch(kind, dtype)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def rel(a, b) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@dataclass
class Run:
    model: torch.nn.Module
    base_after_attach: dict[str, torch.Tensor]
    grad_nonzero: list[dict[str, bool]]  # per step, per trainable tensor
    losses: list[float]


@functools.cache
def training_run(name: str, kind: str, dtype: torch.dtype) -> Run:
    """Attach and train TRAIN_STEPS steps on the fixed batch; shared (read-only) by the tests below."""
    torch.manual_seed(0)
    model = attached(name, kind, dtype)
    model.train()
    case = CASES[name]
    snapshot = base_state(model)
    params = trainable(model)
    opt = case.optimizer(params.values(), lr=case.lr)
    grads, losses = [], []
    for _ in range(TRAIN_STEPS):
        loss = model(**batch(kind, dtype)).loss
        loss.backward()
        grads.append({n: bool(p.grad is not None and p.grad.abs().sum() > 0) for n, p in params.items()})
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    model.eval()
    return Run(model, snapshot, grads, losses)


@functools.cache
def bf16_noise(kind: str) -> float:
    """How far bf16 alone moves the base model's logits from fp32, relative to their scale (qwen ~6e-3,
    stories ~2e-2)."""
    exact = logits(fresh_model(kind, torch.float32), kind, torch.float32)
    rounded = logits(fresh_model(kind, torch.bfloat16), kind, torch.bfloat16)
    return ((rounded - exact).abs().max() / exact.abs().max()).item()


def rounding_tol(dtype: torch.dtype, kind: str) -> float:
    # fp32: 1e-5 of the logit scale. bf16: the adapted path rounds differently from the base (W_res rounded
    # once, a product formed another way), so the bound is 3x the error bf16 itself causes on the base model.
    return 1e-5 if dtype == torch.float32 else 3 * bf16_noise(kind)


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_identity_at_init(name, dtype, kind):
    base = logits(fresh_model(kind, dtype), kind, dtype)
    err = rel(logits(attached(name, kind, dtype), kind, dtype), base)
    print(f"MEASURED identity {name} {kind} {str(dtype)[6:]} {err:.2e}")
    assert err <= rounding_tol(dtype, kind), f"{name}: relative identity error {err:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_storage_never_rounds_the_base_output(name):
    """bf16 adapter tensors on an fp32 model: the hook computes in fp32, so identity is as exact as with fp32."""
    cfg = CASES[name].config("qwen")
    cfg.dtype = torch.bfloat16
    base = logits(fresh_model("qwen"), "qwen", torch.float32)
    err = rel(logits(attached(name, "qwen", torch.float32, cfg=cfg), "qwen", torch.float32), base)
    assert err <= rounding_tol(torch.float32, "qwen"), f"{name}: bf16 storage moved fp32 logits by {err:.3g}"


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_only_adapter_tensors_train_and_base_is_untouched(name, dtype, kind):
    run = training_run(name, kind, dtype)
    names = list(trainable(run.model))
    assert names and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in names), names
    after = base_state(run.model)
    assert after.keys() == run.base_after_attach.keys()
    changed = [k for k in after if not torch.equal(after[k], run.base_after_attach[k])]
    assert not changed, f"base tensors changed during training: {changed[:5]}"
    assert all(p.grad is None for n, p in run.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_every_trainable_tensor_gets_a_gradient_within_two_steps(name, dtype, kind):
    step0, step1 = training_run(name, kind, dtype).grad_nonzero[:2]
    dead = sorted(n for n in step0 if not (step0[n] or step1[n]))
    assert not dead, f"zero gradient at steps 0 and 1: {dead[:5]}"


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_loss_drops(name, dtype, kind):
    losses = training_run(name, kind, dtype).losses
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    # The random tiny Qwen's outputs are near-uniform, so its loss moves by tenths of a percent; the
    # pretrained stories260K moves by tens of percent. Both are far above the run-to-run noise (none: no dropout).
    assert losses[-1] < (1 - 5e-4) * losses[0], f"{name}: loss {losses[0]:.5f} -> {losses[-1]:.5f}"


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_save_load_roundtrip(name, dtype, kind, tmp_path):
    trained = training_run(name, kind, dtype).model
    path = ll.save(trained, tmp_path / "adapter.safetensors")
    loaded = fresh_model(kind, dtype)
    ll.load(loaded, path)
    ours, theirs = adapter_tensors(trained), adapter_tensors(loaded)
    assert sorted(ours) == sorted(theirs)
    unequal = [k for k in ours if not (ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]))]
    assert not unequal, f"tensors differ after reload: {unequal[:5]}"
    assert set(trainable(loaded)) == set(trainable(trained))
    err = (logits(loaded, kind, dtype) - logits(trained, kind, dtype)).abs().max().item()
    assert err <= CASES[name].reload_atol, f"{name}: reload changed the logits by {err:.3g}"


def hooks_and_lora_attrs(model) -> list[str]:
    found = []
    for mname, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            found.append(f"{mname}: hooks")
        found += [f"{mname}.{a}" for a in vars(m) if a.startswith(("lora_", "_lora"))]
        found += [f"{mname}.{a}" for a in [*m._parameters, *m._buffers, *m._modules] if a.startswith("lora_")]
    return found


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_detach_restores_base(name, dtype, kind):
    model = fresh_model(kind, dtype)
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern, so restoring "all True" fails
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = base_state(model)
    base = logits(model, kind, dtype)
    assert hooks_and_lora_attrs(model) == []
    attached(name, kind, dtype, model=model)
    train_steps(model, name, kind, dtype, 2)  # make the adapter non-identity before detaching
    assert not torch.equal(logits(model, kind, dtype), base), "training left the adapter at identity"
    ll.detach(model)
    after = base_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"detach left changed weights: {changed[:5]}"
    assert torch.equal(logits(model, kind, dtype), base)
    assert hooks_and_lora_attrs(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_merged_equals_hooked(name, dtype, kind):
    """merge() folds the adapter into the weights: same logits, no adapter left, other weights untouched."""
    model = attached(name, kind, dtype)
    perturb(model, std=0.02)  # a trained-sized adapter: logits move by 20-60% of their scale
    hooked = logits(model, kind, dtype)
    assert not torch.equal(hooked, logits(fresh_model(kind, dtype), kind, dtype))
    if not mergeable(name):  # its change is not a weight (Lily's data-dependent router): refused, nothing touched
        before = base_state(model) | adapter_tensors(model)
        with pytest.raises(ll.ConversionError, match="neither merged_weight nor delta_weight"):
            ll.merge(model)
        after = base_state(model) | adapter_tensors(model)
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(logits(model, kind, dtype), hooked)
        return
    adapted = set(adapter_layers(model))
    before = {k: v for k, v in base_state(model).items() if k.rsplit(".", 1)[0] not in adapted}
    assert ll.merge(model) is model
    assert hooks_and_lora_attrs(model) == []
    err = (logits(model, kind, dtype) - hooked).abs().max().item() / hooked.abs().max().item()
    print(f"MEASURED merge {name} {kind} {str(dtype)[6:]} {err:.2e}")
    assert err <= rounding_tol(dtype, kind), f"{name}: merged logits differ from hooked by {err:.3g} (relative)"
    after = base_state(model)
    assert not [k for k in before if not torch.equal(before[k], after[k])], "merge changed a non-adapted tensor"


def mergeable(name: str) -> bool:
    method = ll.REGISTRY[name]
    return hasattr(method, "delta_weight") or hasattr(method, "merged_weight")


def perturbed(name, kind, dtype, seed=0):
    model = attached(name, kind, dtype)
    perturb(model, seed=seed, std=0.02)
    return model


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_deepcopy_is_an_independent_model(name, dtype, kind, tmp_path):
    original = perturbed(name, kind, dtype)
    base, adapted = logits(fresh_model(kind, dtype), kind, dtype), logits(original, kind, dtype)
    twin = copy.deepcopy(original)
    with ll.disabled(twin):
        assert torch.equal(logits(twin, kind, dtype), base)
        assert torch.equal(logits(original, kind, dtype), adapted)
    with ll.disabled(original):
        assert torch.equal(logits(twin, kind, dtype), adapted)
    before = adapter_tensors(original)
    twin.train()
    train_steps(twin, name, kind, dtype, 1)
    ll.save(twin, tmp_path / "twin.safetensors")
    after = adapter_tensors(original)
    assert all(torch.equal(before[k], after[k]) for k in before), "training the copy changed the original"
    assert not all(torch.equal(before[k], v) for k, v in adapter_tensors(twin).items()), "the copy did not train"
    reloaded = fresh_model(kind, dtype)
    ll.load(reloaded, tmp_path / "twin.safetensors")
    twin.eval()
    assert torch.equal(logits(reloaded, kind, dtype), logits(twin, kind, dtype))
    assert torch.equal(logits(original, kind, dtype), adapted)


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_pickle_and_torch_save_round_trip(name, dtype, kind):
    model = perturbed(name, kind, dtype)
    adapted = logits(model, kind, dtype)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert torch.equal(logits(restored, kind, dtype), adapted)
        with ll.disabled(restored):
            assert torch.equal(logits(restored, kind, dtype), logits(fresh_model(kind, dtype), kind, dtype))


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_dtype_moves_after_attach_train(name, dtype, kind):
    for target in (torch.float16, torch.float32 if dtype == torch.bfloat16 else torch.bfloat16):
        model = perturbed(name, kind, dtype).to(target)
        model.train()
        params = trainable(model)
        loss = model(**batch(kind, dtype)).loss
        loss.backward()
        assert torch.isfinite(loss), (target, loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
        assert any(p.grad.abs().sum() > 0 for p in params.values())
        torch.optim.SGD(params.values(), lr=1e-3).step()


def second_method(name: str) -> str:
    """The other adapter of the two-adapter checks: the same method, or LoRA beside a weight-rewriting one
    (a layer can carry only one adapter that rewrites its weight)."""
    return "lora" if rewrites_weight(ll.REGISTRY[name]) else name


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_two_named_adapters_each_give_their_own_outputs(name, dtype, kind, tmp_path):
    other = second_method(name)
    alone = {"a": perturbed(name, kind, dtype, seed=1), "b": perturbed(other, kind, dtype, seed=2)}
    expected = {n: logits(m, kind, dtype) for n, m in alone.items()}
    both = fresh_model(kind, dtype)
    for n, m in alone.items():
        ll.save(m, tmp_path / f"{n}.safetensors")
        ll.load(both, tmp_path / f"{n}.safetensors", name=n)
    assert ll.adapter_names(both) == ["a", "b"]
    for n in alone:
        ll.set_active(both, n)
        assert torch.equal(logits(both, kind, dtype), expected[n]), f"adapter {n!r} alone differs"
    ll.set_active(both, [])
    assert torch.equal(logits(both, kind, dtype), logits(fresh_model(kind, dtype), kind, dtype))
    ll.detach(both, "a")
    ll.set_active(both, "b")
    assert torch.equal(logits(both, kind, dtype), expected["b"])


@pytest.mark.parametrize("name,dtype,kind", MATRIX)
def test_per_row_equals_each_row_alone(name, dtype, kind):
    model = perturbed(name, kind, dtype, seed=1)
    if rewrites_weight(ll.REGISTRY[name]) or couples_rows(CASES[name].config(kind)):
        with pytest.raises(ll.AttachStateError, match="cannot route rows"), ll.per_row(model, ["default"] * 4):
            pass
        return
    attached(name, kind, dtype, adapter="b", model=model)
    perturb(model, seed=2, std=0.02, adapter="b")
    routing = ["default", "b", None, "default"]
    with ll.per_row(model, routing):
        mixed = logits(model, kind, dtype)
    assert [a.active for a in iter_adapters(model)] == [True] * len(iter_adapters(model)), "per_row left flags"
    for row, n in enumerate(routing):
        ll.set_active(model, [] if n is None else n)
        alone = logits(model, kind, dtype, rows=[row])[0]
        err = rel(mixed[row], alone)
        assert err <= rounding_tol(torch.float32, kind), f"row {row} ({n}) differs from running it alone by {err:.3g}"
