"""Gradient-based inits (lora_ga, lora_one): the properties their papers prove, checked on the tiny Qwen3.

G is computed here independently (plain backward on the base model, mean over the calibration batches), so
these tests also pin lora_lite.calibration.weight_gradients.
"""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from lora_lite.runtime import adapter_layers
from variant_cases import gsm8k_batches


def reference_gradients(data) -> dict[str, torch.Tensor]:
    model = fresh_model("qwen")
    model.eval()
    for batch in data:
        (model(**batch).loss / len(data)).backward()
    return {n: m.weight.grad for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def truncated(G: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("direction,init_scale", [("ArB2r", "stable"), ("A2rBr", "stable"), ("ArBr", "stable"),
                                                  ("ArB2r", "unit"), ("ArB2r", "gd")])
def test_lora_ga_first_step_is_the_best_rank_2r_gradient_step(direction, init_scale):
    """LoRA-GA's Theorem: at init s·(∇_B A + B ∇_A) = s²c²·G_2r, the best rank-2r approximation of full
    fine-tuning's gradient ("gd": c = 1/s, so exactly G_2r)."""
    data = gsm8k_batches(fresh_model("qwen"))
    G = reference_gradients(data)
    model = fresh_model("qwen")
    cfg = ll.LoRAGAConfig(r=4, alpha=8, svd="full", direction=direction, init_scale=init_scale)
    ll.attach(model, cfg, calibration_data=data)
    for batch in data:
        (model(**batch).loss / len(data)).backward()
    for name, a in adapter_layers(model).items():
        s = cfg.scale
        c2 = {"stable": a.d_out ** 0.5 / cfg.stable_gamma, "unit": 1.0, "gd": 1 / s**2}[init_scale]
        first_step = s * (a.lora_B.grad @ a.lora_A + a.lora_B @ a.lora_A.grad)
        assert rel(first_step, s**2 * c2 * truncated(G[name], 8)) <= 1e-4, name


def test_lora_one_takes_one_rank_r_gradient_step_or_subtracts_it():
    """LoRA-One: s·B0 A0 = −(s/(γ σ₁))·G_r. take_step=True applies it at attach (the calibration loss drops);
    take_step=False starts from the same factors with that step taken out of W (an identity)."""
    data = gsm8k_batches(fresh_model("qwen"))
    G = reference_gradients(data)
    base = fresh_model("qwen")
    loss = {"base": sum(base(**b).loss.item() for b in data)}
    factors = {}
    for take_step in (True, False):
        model = fresh_model("qwen")
        cfg = ll.LoRAOneConfig(r=4, alpha=16, use_rslora=True, svd="full", take_step=take_step)
        ll.attach(model, cfg, calibration_data=data)
        with torch.no_grad():
            loss[take_step] = sum(model(**b).loss.item() for b in data)
        for name, a in adapter_layers(model).items():
            sigma1 = torch.linalg.svdvals(G[name])[0]
            step = cfg.scale * a.lora_B @ a.lora_A
            assert rel(step, -(cfg.scale / (cfg.stable_gamma * sigma1)) * truncated(G[name], 4)) <= 1e-4, name
            moved = a.base.weight - base.get_submodule(name).weight
            assert rel(moved, -step) <= 1e-5 if not take_step else not moved.any(), name
            factors.setdefault(name, []).append((a.lora_A.detach(), a.lora_B.detach()))
    assert loss[True] < loss["base"] and abs(loss[False] - loss["base"]) <= 1e-5 * loss["base"]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in factors.values())


@pytest.mark.parametrize("name", ["lora_ga", "lora_one"])
def test_gradient_inits_leave_no_trace_and_need_a_loss(name):
    model = fresh_model("qwen")
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    cfg = ll.REGISTRY[name].config(r=4)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in gsm8k_batches(model)]
    with pytest.raises(ll.CalibrationError, match="labels"):
        ll.attach(model, cfg, calibration_data=no_labels)
    with pytest.raises(ll.CalibrationError, match="calibration_data"):
        ll.attach(model, cfg)
    assert ll.adapter_names(model) == []
    ll.attach(model, cfg, calibration_data=gsm8k_batches(model))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_adapters." in n for n in trainable)
    ll.detach(model)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")


class NeverIterated:
    def __iter__(self):
        raise AssertionError("the calibration pass ran before the config was checked")


@pytest.mark.parametrize("make_cfg,message", [
    (lambda: ll.LoRAGAConfig(r=20), r"2r=40 singular vectors.*r<=16"),
    (lambda: ll.LoRAGAConfig(r=4, direction="BrA2r"), r"direction='BrA2r' must be one of"),
    (lambda: ll.LoRAGAConfig(r=4, init_scale="weight_svd"), r"init_scale='weight_svd'"),
    (lambda: ll.LoRAOneConfig(r=4, stable_gamma=0.0), r"stable_gamma=0.0 must be > 0"),
])
def test_bad_gradient_init_configs_are_refused_before_the_gradient_pass(make_cfg, message):
    model = fresh_model("qwen")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match=message):
        ll.attach(model, make_cfg(), calibration_data=NeverIterated())
    assert ll.adapter_names(model) == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
