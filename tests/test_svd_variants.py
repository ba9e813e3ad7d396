"""Variant-specific checks for the SVD-basis and calibration variants: eva, lora_xs and the antipasto family.

The generic invariants (identity, save/load, detach, bf16, ...) run for every variant in the invariant matrix;
these tests pin the math each variant claims in its docstring and the calibration rules of the prototype.
"""

import copy

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model, gsm8k_rows, stories_tokenizer
from lora_lite.calibration import input_moments
from lora_lite.runtime import adapter_layers
from lora_lite.svd import top_r_svd
from lora_lite.variants import _svd_basis as basis
from lora_lite.variants.antipasto import block_rotations
from lora_lite.variants.antipasto_ablate import core as ablate_core
from toy_models import ToyModel
from variant_cases import CASES

QK = (r"self_attn\.[qk]_proj$",)
DATA_VARIANTS = {n: m.config for n, m in ll.REGISTRY.items() if getattr(m, "requires_calibration", False)}


@pytest.fixture(scope="module")
def batches():
    """4 left-padded batches of 2 GSM8K questions, tokenised for stories260K (labels for the gradient inits)."""
    tok = stories_tokenizer()
    texts = [r["question"] for r in gsm8k_rows("train", 8)]
    batches = [dict(tok(texts[i:i + 2], return_tensors="pt", padding=True)) for i in range(0, 8, 2)]
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_untouched(model, snap):
    state, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert ll.adapter_names(model) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(m, "lora_adapters") for m in model.modules())


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise_trainables(model, scale=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def adapter(model, layer_name):
    return model.get_submodule(layer_name).lora_adapters.default


def layer_output_check(a, x):
    """forward == x (W + delta_weight)ᵀ + b with the runtime's hook: the delta_weight form is the forward."""
    y = a.base(x)
    expected = x @ (a.base.weight.float() + a.variant.delta_weight(a)).T
    if a.base.bias is not None:
        expected = expected + a.base.bias
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


# ---- calibration rules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(DATA_VARIANTS))
def test_calibration_variants_raise_without_data_and_leave_model(variant, batches):
    model = fresh_model("stories")
    snap = snapshot(model)
    cfg = DATA_VARIANTS[variant](r=8, target_names=QK)
    with pytest.raises(ll.CalibrationError, match="calibration_data"):
        ll.attach(model, cfg)
    assert_untouched(model, snap)
    with pytest.raises(ll.CalibrationError, match="0 non-padding"):  # group_init fails after init ran
        ll.attach(model, cfg, calibration_data=[])
    assert_untouched(model, snap)
    short = {k: batches[0][k][:1, -10:] for k in ("input_ids", "labels")}  # 10 tokens for r=16
    with pytest.raises(ll.CalibrationError, match=r"10 non-padding calibration tokens, fewer than (r=|the )(16|32)"):
        ll.attach(model, DATA_VARIANTS[variant](r=16, target_names=QK), calibration_data=[short])
    assert_untouched(model, snap)


@pytest.mark.parametrize("variant", sorted(DATA_VARIANTS))
def test_checkpoint_loads_without_data_and_never_reruns_group_init(variant, batches, tmp_path, monkeypatch):
    model = fresh_model("stories")
    snap = snapshot(model)
    ll.attach(model, DATA_VARIANTS[variant](r=8, target_names=QK), calibration_data=batches)
    randomise_trainables(model)
    ll.save(model, tmp_path / "a.safetensors")
    expected = logits(model, batches[0])
    ll.detach(model)
    assert_untouched(model, snap)  # every weight the init rewrote is restored bit-exactly

    def no_group_init(*args):
        raise AssertionError("load() must not run group_init")

    monkeypatch.setattr(ll.REGISTRY[variant], "group_init", staticmethod(no_group_init))
    fresh = fresh_model("stories")
    ll.load(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(fresh, batches[0]), expected, rtol=0, atol=0)


def test_eva_A_is_top_right_singular_vectors_of_masked_inputs(batches):
    model = fresh_model("stories")
    name = "model.layers.3.self_attn.q_proj"
    rows, masks = [], []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 64)))
    for b in batches:
        logits(model, b)
        masks.append(b["attention_mask"].reshape(-1).bool())
    handle.remove()
    X = torch.cat(rows)[torch.cat(masks)]
    Vh = torch.linalg.svd(X, full_matrices=False)[2][:8]

    ll.attach(model, ll.EVAConfig(r=8, target_names=QK), calibration_data=batches)
    a = adapter(model, name)
    overlap = (a.lora_A.detach() @ Vh.T).abs()  # ±1 on the diagonal: same vectors up to sign
    torch.testing.assert_close(overlap.diagonal(), torch.ones(8), rtol=0, atol=1e-3)
    assert a.lora_A.requires_grad and a.lora_B.requires_grad
    assert not a.lora_B.any()


def output_error(W, approx, C):
    """E‖(W − approx) x‖² for inputs with second moment C."""
    D = W - approx
    return torch.trace(D @ C @ D.T).item()


def test_corda_basis_is_the_covariance_oriented_svd(batches):
    model = fresh_model("stories")
    name = "model.layers.2.self_attn.q_proj"
    W = model.get_submodule(name).weight.detach().clone()
    (C,) = input_moments(model, [model.get_submodule(name)], batches, min_tokens=1, variant="probe")
    ll.attach(model, ll.AntiPaSTOCorDAConfig(r=8, target_names=QK, svd="full"), calibration_data=batches)
    a = adapter(model, name)
    lam, Q = torch.linalg.eigh(C)
    lam = lam.clamp_min(0) + 1e-3
    U, S, Vt = torch.linalg.svd(W @ (Q * lam.sqrt()) @ Q.T)
    torch.testing.assert_close(a.lora_S, S[:8], rtol=1e-4, atol=1e-5)
    P = Vt[:8] @ (Q * lam.rsqrt()) @ Q.T
    torch.testing.assert_close((a.lora_U * a.lora_S) @ a.lora_P, (U[:, :8] * S[:8]) @ P, rtol=1e-3, atol=1e-4)
    # a data-driven run, not plain top-r: on the calibration inputs it loses less of W's output than plain SVD
    Up, Sp, Vp = top_r_svd(W, 8, "full")
    corda_err = output_error(W, basis.basis_delta(a, "lora_P"), C)
    assert corda_err < 0.97 * output_error(W, (Up * Sp) @ Vp, C)
    torch.testing.assert_close(a.base.weight + basis.basis_delta(a, "lora_P"), W, rtol=0, atol=1e-6)


def test_asvd_basis_is_the_activation_scaled_svd(batches):
    model = fresh_model("stories")
    name = "model.layers.2.self_attn.q_proj"
    W = model.get_submodule(name).weight.detach().clone()
    (c,) = input_moments(model, [model.get_submodule(name)], batches, min_tokens=1, variant="probe", diagonal=True)
    c = c + 1e-3
    ll.attach(model, ll.AntiPaSTOASVDConfig(r=8, target_names=QK, svd="full"), calibration_data=batches)
    a = adapter(model, name)
    U, S, Vt = torch.linalg.svd(W * c.sqrt())
    torch.testing.assert_close(a.lora_S, S[:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((a.lora_U * a.lora_S) @ a.lora_P,
                               (U[:, :8] * S[:8]) @ (Vt[:8] * c.rsqrt()), rtol=1e-3, atol=1e-4)
    Up, Sp, Vp = top_r_svd(W, 8, "full")
    weighted = torch.diag(c)
    assert output_error(W, basis.basis_delta(a, "lora_P"), weighted) < 0.97 * output_error(
        W, (Up * Sp) @ Vp, weighted)


# ---- antipasto rotation --------------------------------------------------------------------------------------

def test_cayley_blocks_are_orthogonal_rotations():
    torch.manual_seed(0)
    T = torch.randn(16, 6) * 3  # large enough that the tanh saturation is active
    R = block_rotations(T, 4, 0.5)
    eye = torch.eye(4).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(16), rtol=0, atol=1e-5)
    assert torch.equal(block_rotations(torch.zeros(16, 6), 4, 0.5), eye)  # T = 0 is exactly R = I


@pytest.mark.parametrize("rotate_basis", ["V", "U", "both", "none"])
def test_blockwise_rotation_equals_dense_block_diagonal(rotate_basis):
    model = fresh_model("qwen")
    ll.attach(model, ll.AntiPaSTOConfig(r=16, rotate_basis=rotate_basis, target_names=(r"0\.self_attn\.q_proj$",)))
    a = adapter(model, "model.layers.0.self_attn.q_proj")
    randomise_trainables(model)
    cfg = a.cfg

    def dense(T):
        return torch.block_diag(*block_rotations(T, 4, cfg.max_rotation_angle))

    R_v = dense(a.lora_rot_T) if rotate_basis in ("V", "both") else torch.eye(16)
    R_u = {"U": lambda: dense(a.lora_rot_T), "both": lambda: dense(a.lora_rot_T_u)}.get(
        rotate_basis, lambda: torch.eye(16))()
    torch.testing.assert_close(R_v @ R_v.T, torch.eye(16), rtol=0, atol=1e-5)
    S_eff = a.lora_S + a.lora_delta_s
    delta = (a.lora_U @ R_u.T * S_eff) @ (R_v @ a.lora_Vh)
    x = torch.randn(3, 5, 64)
    expected = x @ (a.base.weight + delta).T + a.base.bias
    torch.testing.assert_close(a.base(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.variant.delta_weight(a), delta.detach(), rtol=1e-4, atol=1e-6)
    n_rot = {"V": 1, "U": 1, "both": 2, "none": 0}[rotate_basis]
    n_train = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert n_train == 16 + n_rot * 4 * 6


# ---- gain family ------------------------------------------------------------------------------------------

GAIN_VARIANTS = {n: m.config for n, m in ll.REGISTRY.items() if issubclass(m.config, basis.GainConfig)}


@pytest.mark.parametrize("variant", sorted(GAIN_VARIANTS))
def test_gain_is_exactly_one_at_init(variant, batches):
    model = fresh_model("stories")
    data = batches if variant in DATA_VARIANTS else None
    ll.attach(model, GAIN_VARIANTS[variant](r=8, target_names=QK), calibration_data=data)
    adapters = adapter_layers(model).values()
    assert all(torch.equal(basis.gain(a), torch.ones(8)) for a in adapters)
    randomise_trainables(model)
    for a in adapters:
        layer_output_check(a, torch.randn(2, 7, 64))  # forward == the delta_weight form, trained


def test_gain_bounds_and_coeff():
    model = fresh_model("qwen")
    cfg = ll.AntiPaSTOGainConfig(r=16, target_names=(r"0\.self_attn\.q_proj$",), suppress_only=True)
    ll.attach(model, cfg)
    a = adapter(model, "model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        a.lora_g.copy_(torch.linspace(-5, 5, 16))
    g = basis.gain(a)
    assert (g > 0).all() and (g <= 1).all() and (g[8:] == 1).all()
    cfg.suppress_only, cfg.coeff = False, 0.0
    assert torch.equal(basis.gain(a), torch.ones(16))  # coeff = 0 gives back W
    cfg.coeff = 1.0
    torch.testing.assert_close(basis.gain(a), torch.where(a.lora_g > 0, 1 + a.lora_g, a.lora_g.exp()).detach())


def test_ablate_core_damps_or_amplifies_within_bounds_and_matches_forward():
    model = fresh_model("qwen")
    ll.attach(model, ll.AntiPaSTOAblateConfig(r=16, k=3, target_names=(r"0\.self_attn\.o_proj$",)))
    a = adapter(model, "model.layers.0.self_attn.o_proj")
    assert torch.equal(ablate_core(a).detach(), torch.eye(16))  # α = tanh(0) = 0: exactly the identity at init
    with torch.no_grad():
        a.lora_alpha.copy_(torch.tensor([0.3, 20.0, -20.0]))  # α = tanh: ~0.29, ~1, ~-1
    eig = torch.linalg.eigvalsh(ablate_core(a).detach())
    assert eig.min() >= -1e-5 and eig.max() <= 2 + 1e-5
    assert eig.min() < 1e-4 and eig.max() > 2 - 1e-4  # α ≈ 1 removes its direction, α ≈ -1 doubles it
    layer_output_check(a, torch.randn(2, 5, 64))


# ---- lora_xs -------------------------------------------------------------------------------------------

def test_lora_xs_frozen_factors_and_intact_weight():
    model = fresh_model("qwen")
    snap = snapshot(model)
    ll.attach(model, ll.LoRAXSConfig(r=8, target_names=QK, svd="full"))
    a = adapter(model, "model.layers.1.self_attn.q_proj")
    W = snap[0]["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(a.base.weight, W)  # W is never rewritten
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(a.lora_A, S[:8, None] * Vh[:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.lora_B, U[:, :8], rtol=1e-4, atol=1e-5)
    assert [n for n, p in a.named_parameters() if p.requires_grad] == ["lora_R"]
    assert "lora_A" in a._buffers and "lora_B" in a._buffers
    R = a.lora_R.detach()
    assert R.shape == (8, 8) and not R.any()  # zeros: exact identity, and R's gradient does not depend on R
    assert a.cfg.alpha == 8 and a.cfg.scale == 1.0
    assert ll.LoRAXSConfig(r=8, alpha=4).scale == 0.5
    randomise_trainables(model)
    layer_output_check(a, torch.randn(2, 5, 64))


# ---- configs and shapes ------------------------------------------------------------------------------------

def test_default_r_256_on_a_small_layer_names_the_fix():
    model = fresh_model("stories")
    snap = snapshot(model)
    with pytest.raises(ll.ConfigError, match=r"r=256 exceeds min\(d_in, d_out\)=64 .*pass r<=64"):
        ll.attach(model, ll.AntiPaSTOGainConfig())
    assert_untouched(model, snap)


def test_bad_knobs_raise_config_errors():
    model = fresh_model("qwen")
    for cfg, msg in [(ll.AntiPaSTOGainConfig(r=16, svd="bogus"), "svd='bogus'"),
                     (ll.LoRAXSConfig(r=16, niter=-1), "niter=-1"),(ll.AntiPaSTOConfig(r=16, block_size=3), "block_size=3"),
                     (ll.AntiPaSTOConfig(r=16, rotate_basis="W"), "rotate_basis='W'"),
                     (ll.AntiPaSTOAblateConfig(r=16, k=0), "k=0"),
                     (ll.AntiPaSTODPLRConfig(r=16, core_rank=17), "core_rank=17")]:
        with pytest.raises(ll.ConfigError, match=msg):
            ll.attach(model, cfg)
        assert ll.adapter_names(model) == []


@pytest.mark.parametrize("cfg", [ll.AntiPaSTOGainConfig(r=16, svd="full"), ll.AntiPaSTOGainConfig(r=16, niter=2),
                                 ll.LoRAXSConfig(r=8, svd="full"), ll.PiSSAConfig(r=8, svd="full")],
                         ids=lambda c: f"{c.variant}-{c.svd}")
def test_both_svd_methods_keep_identity(cfg):
    model = fresh_model("qwen")
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        y0 = model(x).logits
    ll.attach(model, copy.deepcopy(cfg))
    with torch.no_grad():
        y1 = model(x).logits
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-4)


# ---- layer types -------------------------------------------------------------------------------------------

def test_eva_is_hook_only_and_runs_on_linear_like_layers():
    """EVA never reads W, so it takes layers that are not nn.Linear (as bitsandbytes layers are not)."""
    model = ToyModel()
    data = [torch.randn(2, 8, 16) for _ in range(3)]  # plain tensors: called as model(batch)
    base = model(data[0])
    ll.attach(model, ll.EVAConfig(r=4), calibration_data=data)
    adapters = adapter_layers(model).values()
    assert all(type(a.base).__name__ == "LinearLike" for a in adapters)
    assert all(a.lora_A.abs().sum() > 0 for a in adapters)
    torch.testing.assert_close(model(data[0]), base, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(n for n, m in ll.REGISTRY.items() if getattr(m, "needs_dense_weight", False)))
def test_weight_reading_variants_reject_linear_like_layers(name):
    model = ToyModel()
    snap = snapshot(model)
    with pytest.raises(ll.UnsupportedLayerError, match=r"LinearLike.*plain float nn.Linear"):
        ll.attach(model, CASES[name].config("toy"), calibration_data=[torch.randn(2, 8, 16)])
    assert_untouched(model, snap)


def test_lowrank_default_captures_the_top_r_spectrum():
    """The default svd="lowrank" (niter=4) against the exact SVD on a slowly decaying spectrum (docs/svd.md)."""
    assert ll.PiSSAConfig().svd == "lowrank" and ll.AntiPaSTOGainConfig().niter == 4
    g = torch.Generator().manual_seed(0)
    Q1, Q2 = (torch.linalg.qr(torch.randn(256, 256, generator=g))[0] for _ in range(2))
    W = (Q1 * torch.arange(1, 257).pow(-0.5)) @ Q2.T
    _, S_full, _ = top_r_svd(W, 16, "full")
    U, S, Vh = top_r_svd(W, 16, "lowrank", 4)
    assert S.square().sum() / S_full.square().sum() > 0.99
    torch.testing.assert_close(U.T @ U, torch.eye(16), rtol=0, atol=1e-4)
    assert torch.equal(top_r_svd(W, 16, "lowrank", 4)[1], S)  # seeded: the same init on every call
