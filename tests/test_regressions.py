"""The prototype's recorded bugs (seed_spec §10), each pinned by a test that the old code fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_lite as ll
from conftest import fresh_model
from lora_lite.runtime import adapter_layers
from lora_lite.variants.hra import HRA
from lora_lite.variants.road import Road

Q = "model.layers.0.self_attn.q_proj"


def one_layer(model, cfg):
    ll.attach(model, cfg)
    return adapter_layers(model)[Q] if Q in adapter_layers(model) else next(iter(adapter_layers(model).values()))


def test_hra_applies_R_on_the_input_side_in_the_right_order():
    """§10.6: with the pairs broken, the layer must compute x (W R)ᵀ + b with R = H_0 H_1 … H_{r−1}.

    The symmetric init hides an order bug (R = Rᵀ at t=0), so U is perturbed first.
    """
    torch.manual_seed(0)
    a = one_layer(fresh_model("qwen"), ll.HRAConfig(r=4, target_names=(rf"{Q}$",)))
    with torch.no_grad():
        a.lora_U.add_(0.1 * torch.randn_like(a.lora_U))
    R = torch.eye(a.d_in)
    for u in a.lora_U:
        R = R @ (torch.eye(a.d_in) - 2 * torch.outer(u, u) / (u @ u))
    assert not torch.allclose(R, R.T, atol=1e-3), "pairs not broken: R is symmetric, the test would not see order"
    x = torch.randn(3, 5, a.d_in)
    expected = F.linear(x, a.base.weight @ R, a.base.bias)
    torch.testing.assert_close(a.base(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(HRA.rotation(a), R, rtol=0, atol=1e-5)


def test_dora_with_bias_keeps_identity_and_does_not_rescale_the_bias():
    """§10.8: y' = (m/‖V‖) ⊙ (x Vᵀ) + b; the prototype scaled b along with everything else."""
    model = fresh_model("qwen")
    a = one_layer(model, ll.DoRAConfig(r=4, target_names=(rf"{Q}$",)))
    assert a.base.bias is not None and a.base.bias.abs().max() > 0
    x = torch.randn(3, a.d_in)
    base = F.linear(x, a.base.weight, a.base.bias)
    assert torch.equal(a.base(x), base), "identity at init"
    with torch.no_grad():
        a.lora_m.mul_(2.0)  # B = 0, so V = W and the magnitude factor is exactly 2
    torch.testing.assert_close(a.base(x), 2 * F.linear(x, a.base.weight) + a.base.bias, rtol=1e-6, atol=1e-6)


def test_delora_default_lambda_gives_B_a_gradient_at_step_0():
    """§10.5: λ0 = 0 (or a normalised B) left every gradient dead; B = 0 still gets one through the clamp."""
    assert ll.DeLoRAConfig().lambda0 > 0
    a = one_layer(fresh_model("qwen"), ll.DeLoRAConfig(r=4, target_names=(rf"{Q}$",)))
    a.base(torch.randn(4, a.d_in)).square().sum().backward()
    assert a.lora_B.grad.abs().max() > 0
    assert a.lora_lambda.grad.abs().max() == 0 and a.lora_A.grad.abs().max() == 0  # both need B ≠ 0


@pytest.mark.parametrize("lambda0", [0.0, -1.0])
def test_delora_rejects_nonpositive_lambda0(lambda0):
    with pytest.raises(ll.ConfigError, match="lambda0"):
        ll.attach(fresh_model("qwen"), ll.DeLoRAConfig(r=4, lambda0=lambda0))


def rewrite(src, dst, edit):
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst), metadata=metadata)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(sorted(t)[0]), r"missing tensors \['model.layers.0.mlp.down_proj.lora_A'\], unexpected tensors \[\]"),
    (lambda t: t.__setitem__(f"{Q}.lora_adapters.default.lora_extra", torch.zeros(2)),
     rf"missing tensors \[\], unexpected tensors \['{Q}.lora_extra'\]"),
], ids=["missing", "unexpected"])
def test_load_is_strict_about_keys(tmp_path, edit, message):
    """§10.3: a file with a missing or an extra lora_ tensor is refused, and the model is left alone."""
    model = fresh_model("qwen")
    ll.attach(model, ll.LoRAConfig(r=4))
    ll.save(model, tmp_path / "good.safetensors")
    rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", edit)
    target = fresh_model("qwen")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ll.CheckpointError, match=message):
        ll.load(target, tmp_path / "bad.safetensors")
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert ll.adapter_names(target) == []


def test_no_matching_target_is_an_error():
    with pytest.raises(ll.TargetError, match="no target layers matched"):
        ll.attach(fresh_model("qwen"), ll.LoRAConfig(target_names=(r"nothing_here$",)))


@pytest.mark.parametrize("road_variant", ["road_1", "road_2", "road_4"])
def test_road_fast_path_equals_the_explicit_rotation(road_variant):
    torch.manual_seed(0)
    a = one_layer(fresh_model("qwen"), ll.RoadConfig(road_variant=road_variant, group_size=8,
                                                         target_names=(rf"{Q}$",)))
    with torch.no_grad():
        a.lora_road_theta.normal_(0, 0.7)
        a.lora_road_alpha.normal_(1, 0.3)
    x = torch.randn(3, 4, a.d_in)
    y = F.linear(x, a.base.weight, a.base.bias)
    R = Road.rotation(a)
    assert not torch.allclose(R, torch.diag(torch.diagonal(R))), "rotation has no off-diagonal part"
    torch.testing.assert_close(a.base(x), y @ R.T, rtol=0, atol=1e-6)


def test_ia3_ff_gates_the_input_of_down_proj():
    """§10.7: the FFN gate scales the intermediate activation entering down_proj, not up_proj's output."""
    model = fresh_model("qwen")
    ll.attach(model, ll.IA3FFConfig())
    layers = adapter_layers(model)
    assert sorted(layers) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    a = layers["model.layers.0.mlp.down_proj"]
    assert a.lora_g.shape == (a.d_in,)
    with torch.no_grad():
        a.lora_g.uniform_(0.5, 1.5)
    x = torch.randn(3, a.d_in)
    torch.testing.assert_close(a.base(x), F.linear(x * a.lora_g, a.base.weight, a.base.bias), rtol=0, atol=1e-6)

