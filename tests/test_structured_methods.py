"""Paper properties of the structured methods that we can reproduce at tiny-Qwen scale (dims 64/32/128), and
the behaviour of their model-level state: what Lily shares, what VeRA and SHiRA rebuild instead of storing, how
SingLoRA ramps. The invariant matrix and the PEFT parity tests cover everything these methods share with the rest.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import perturb
from lora_lite.cost.peft_map import build_peft_model
from lora_lite.runtime import adapter_layers
from lora_lite.variants.boft import butterfly_perm, cayley, rotate
from lora_lite.variants.lily import layer_groups

peft = pytest.importorskip("peft")


def attach(cfg, seed=0, std=0.0):
    torch.manual_seed(seed)
    model = fresh_model("qwen")
    ll.attach(model, cfg)
    if std:
        perturb(model, seed=seed, std=std)
    return model, adapter_layers(model)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # each shared tensor once


def peft_twin(model, cfg):
    return build_peft_model(fresh_model("qwen"), cfg, list(adapter_layers(model)))[0]


def ids(t=10, n=2, seed=3):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


# ---------------------------------------------------------------------------------------------- Lily


def test_lily_shares_a_in_strides_and_b_per_group_with_peft_s_parameter_count():
    cfg = ll.LilyConfig(r=4, stride_a=2, num_b=3)
    model, layers = attach(cfg)
    groups = layer_groups(model, list(layers.values()))
    assert len(groups) == 7 and all(len(g) == 2 for g in groups.values())  # q, k, v, o, gate, up, down x 2 blocks
    expected = 0
    for g in groups.values():
        assert g[0].lora_A is g[1].lora_A and g[0].lora_B is g[1].lora_B and g[0].lora_router is not g[1].lora_router
        expected += cfg.r * g[0].d_in + cfg.num_b * cfg.r * g[0].d_out + len(g) * cfg.num_b * cfg.r
    assert trainable_count(model) == expected == trainable_count(peft_twin(model, cfg))
    _, unshared = attach(ll.LilyConfig(r=4, stride_a=1, num_b=3))
    q0, q1 = (unshared[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    assert q0.lora_A is not q1.lora_A and q0.lora_B is q1.lora_B


def test_lily_ties_survive_load_and_deepcopy(tmp_path):
    model, _ = attach(ll.LilyConfig(r=4, stride_a=2), std=0.05)
    loaded = fresh_model("qwen")
    ll.load(loaded, ll.save(model, tmp_path / "lily.safetensors"))
    for twin in (loaded, copy.deepcopy(model)):
        layers = adapter_layers(twin)
        q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
        assert q0.lora_A is q1.lora_A and q0.lora_B is q1.lora_B
        assert torch.equal(logits(twin, ids()), logits(model, ids()))


def test_lily_refuses_a_file_whose_shared_copies_differ(tmp_path):
    model, _ = attach(ll.LilyConfig(r=4, stride_a=2), std=0.05)
    path = ll.save(model, tmp_path / "lily.safetensors")
    tensors = load_file(path)
    key = "model.layers.1.self_attn.q_proj.lora_adapters.default.lora_B"
    tensors[key] = tensors[key] + 1.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "edited.safetensors", metadata=meta)
    target = fresh_model("qwen")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ll.CheckpointError, match="different values of the shared lora_B"):
        ll.load(target, tmp_path / "edited.safetensors")
    assert ll.adapter_names(target) == [] and all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_lily_token_mixing_is_causal_and_batch_mixing_is_not():
    """PEFT's (and the paper's) batch mean makes earlier positions depend on later tokens; mixing="token" does not."""
    x = ids(t=12)
    later = x.clone()
    later[:, -1] = (later[:, -1] + 1) % 128
    moved = {}
    for mixing in ("batch", "token"):
        model, _ = attach(ll.LilyConfig(r=4, num_b=3, mixing=mixing), std=0.3)
        moved[mixing] = (logits(model, x)[:, :-1] - logits(model, later)[:, :-1]).abs().max().item()
    assert moved["token"] <= 1e-6 < 1e-4 < moved["batch"], moved


def test_lily_token_mixing_routes_rows_independently():
    model, _ = attach(ll.LilyConfig(r=4, num_b=3, mixing="token"), std=0.3)
    x = ids(n=3)
    with ll.per_row(model, ["default", None, "default"]):
        mixed = logits(model, x)
    assert torch.allclose(mixed[0], logits(model, x[:1])[0], atol=1e-5)
    with ll.disabled(model):
        assert torch.allclose(mixed[1], logits(model, x[1:2])[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- HiRA, GraLoRA, ABBA, LoHa


def rank(delta: torch.Tensor) -> int:
    """Numerical rank of an fp32 matrix: singular values above fp32 rounding of the largest."""
    return int(torch.linalg.matrix_rank(delta.detach().double(), rtol=1e-5))


@pytest.mark.parametrize("cfg,expected", [
    (ll.HiRAConfig(r=2), 32),                      # W ⊙ BA: full rank though r = 2
    (ll.GraLoRAConfig(r=4, k=2), 8),               # k·r with a rank-r LoRA's parameter count
    (ll.ABBAConfig(r=3, r2=3), 9),                 # r·r2 from (r + r2)(d_in + d_out) numbers
    (ll.LoHaConfig(r=3), 9),                       # r²
], ids=["hira", "gralora", "abba", "loha"])
def test_high_rank_updates_reach_the_rank_their_papers_claim(cfg, expected):
    _, layers = attach(cfg, std=0.3)
    a = layers["model.layers.0.self_attn.k_proj"]  # 64 -> 32
    assert rank(a.variant.delta_weight(a)) == expected
    assert sum(p.numel() for p in a.parameters() if p.requires_grad) == {
        "hira": 2 * (64 + 32), "gralora": 4 * (64 + 32), "abba": 6 * (64 + 32), "loha": 6 * (64 + 32)}[cfg.variant]


def test_abba_first_pair_starts_as_w_s_best_rank_r_approximation():
    _, layers = attach(ll.ABBAConfig(r=4, svd="full"))
    a = layers["model.layers.0.mlp.up_proj"]
    W = a.base.weight.double()
    S = torch.linalg.svdvals(W)
    err = torch.linalg.matrix_norm(W - (a.lora_B1 @ a.lora_A1).detach().double()).item()
    assert err == pytest.approx(S[4:].square().sum().sqrt().item(), rel=1e-5)  # Eckart-Young


# ---------------------------------------------------------------------------------------------- SHiRA, VeRA: rebuilt state


def test_shira_mask_is_peft_s_and_only_masked_entries_move(tmp_path):
    cfg = ll.SHiRAConfig(r=2, seed=5)
    model, layers = attach(cfg, std=0.1)
    twin = peft_twin(model, cfg)
    for name, a in layers.items():
        peft_layer = twin.base_model.model.get_submodule(name)
        rows, cols = peft_layer.shira_indices["default"].long()
        assert torch.equal(a.lora_index, rows * a.d_in + cols)
        delta = a.variant.delta_weight(a)
        assert int((delta != 0).sum()) == 2 * (a.d_in + a.d_out)
    path = ll.save(model, tmp_path / "shira.safetensors")
    assert {k.rsplit(".", 1)[1] for k in load_file(path)} == {"lora_values"}  # the mask is not stored
    reloaded = fresh_model("qwen")
    ll.load(reloaded, path)
    assert torch.equal(logits(reloaded, ids()), logits(model, ids()))


def test_vera_projections_are_peft_s_shared_and_not_stored(tmp_path):
    cfg = ll.VeRAConfig(r=8, seed=3)
    model, layers = attach(cfg, std=0.1)
    peft_layer = peft_twin(model, cfg).base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    for a in layers.values():  # PEFT's pair is sized by the largest layer, as ours
        assert torch.equal(a.lora_proj_A, peft_layer.vera_A["default"][:, :a.d_in])
        assert torch.equal(a.lora_proj_B, peft_layer.vera_B["default"][:a.d_out])
    assert len({a.lora_proj_A.untyped_storage().data_ptr() for a in layers.values()}) == 1  # one pair in memory
    assert trainable_count(model) == sum(cfg.r + a.d_out for a in layers.values())
    path = ll.save(model, tmp_path / "vera.safetensors")
    assert {k.rsplit(".", 1)[1] for k in load_file(path)} == {"lora_d", "lora_b"}
    reloaded = fresh_model("qwen")
    ll.load(reloaded, path)
    assert torch.equal(logits(reloaded, ids()), logits(model, ids()))


# ---------------------------------------------------------------------------------------------- MiSS, LoKr, OFT: structure


@pytest.mark.parametrize("mode", ["miss", "mini"])
def test_miss_shares_one_shard_across_the_weight(mode):
    _, layers = attach(ll.MiSSConfig(r=8, mode=mode, mini_r=4), std=0.1)
    a = layers["model.layers.0.mlp.up_proj"]  # 64 -> 128
    delta = a.variant.delta_weight(a)
    assert torch.equal(delta[:, :-8], delta[:, 8:])  # every r-wide input shard sees the same D
    if mode == "mini":
        assert torch.equal(delta[:-4], delta[4:])  # and D repeats every mini_r outputs
    A, B, s = a.variant.lora_factors(a)
    torch.testing.assert_close(s * B @ A, delta)
    assert a.lora_D.numel() == {"miss": 8 * 128, "mini": 8 * 4}[mode]


def test_miss_bat_has_no_lora_export():
    _, layers = attach(ll.MiSSConfig(r=8, mode="bat"), std=0.1)
    a = layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(ll.ConversionError, match="not low-rank"):
        a.variant.lora_factors(a)


def test_lokr_update_is_a_kronecker_product_with_peft_s_factor_shapes():
    cfg = ll.LoKrConfig(r=4, alpha=4)
    model, layers = attach(cfg, std=0.1)
    a = layers["model.layers.0.mlp.gate_proj"]  # 64 = 8·8 -> 128 = 8·16, W2 factored (r < 16/2)
    W2 = a.lora_w2_a @ a.lora_w2_b
    torch.testing.assert_close(a.variant.delta_weight(a), torch.kron(a.lora_w1, W2))
    assert trainable_count(model) == trainable_count(peft_twin(model, cfg))


@pytest.mark.parametrize("neumann", [False, True])
def test_oft_keeps_the_angles_between_neurons(neumann):
    """Orthogonal finetuning preserves W Wᵀ (the paper's hyperspherical energy); PEFT's Neumann series only
    approximately, to O(Q⁴)."""
    _, layers = attach(ll.OFTConfig(block_size=8, cayley_neumann=neumann), std=0.01)
    a = layers["model.layers.0.self_attn.q_proj"]
    W = a.base.weight.float()
    with torch.no_grad():
        merged, _ = a.variant.merged_weight(a, W, None)
    err = ((merged @ merged.T) - W @ W.T).abs().max() / (W @ W.T).abs().max()
    assert err < (1e-4 if neumann else 1e-6), err.item()


# ---------------------------------------------------------------------------------------------- SingLoRA


def test_singlora_ramps_in_over_training_forwards_and_resumes_after_load(tmp_path):
    model, layers = attach(ll.SingLoRAConfig(r=4, alpha=4, ramp_steps=4))
    a = layers["model.layers.0.self_attn.q_proj"]  # square: ΔW = s·u·AᵀA is symmetric
    base = logits(fresh_model("qwen"), ids())
    assert torch.equal(logits(model, ids()), base)  # u(0) = 0 whatever A is
    model.train()
    for _ in range(3):
        model(input_ids=ids()).logits.sum().backward()
    with torch.no_grad():
        model(input_ids=ids())  # no grad: not a training forward
    model.eval()
    model(input_ids=ids())  # eval: not counted either
    assert a.lora_step.item() == 3
    delta = a.variant.delta_weight(a)
    torch.testing.assert_close(delta, delta.T)
    A_in, B, s = a.variant.lora_factors(a)
    assert s == pytest.approx(1.0 * 3 / 4)
    path = ll.save(model, tmp_path / "sing.safetensors")
    reloaded = fresh_model("qwen")
    ll.load(reloaded, path)
    assert adapter_layers(reloaded)["model.layers.0.self_attn.q_proj"].lora_step.item() == 3
    assert torch.equal(logits(reloaded, ids()), logits(model, ids()))


def test_singlora_refuses_a_ramp_16_bit_storage_cannot_count():
    with pytest.raises(ll.ConfigError, match="counts steps exactly only up to 256"):
        ll.attach(fresh_model("qwen"), ll.SingLoRAConfig(r=4, ramp_steps=1000, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------- BOFT


@pytest.mark.parametrize("d_in,block_size,factors", [(64, 4, 3), (128, 8, 3), (64, 2, 4)])
def test_boft_butterfly_permutations_are_peft_s(d_in, block_size, factors):
    from peft.tuners.boft.layer import BOFTLayer

    for level in range(factors):
        theirs = BOFTLayer.block_butterfly_perm(None, d_in, d_in // block_size // 2 ** level, block_size // 2,
                                                factors - 1)
        assert torch.equal(butterfly_perm(d_in, block_size, level), theirs)


def test_boft_rotation_is_orthogonal_and_mixes_beyond_one_block():
    """With m factors a block of b inputs reaches b·2^(m−1) of them, at the parameter cost of m block-diagonals."""
    _, layers = attach(ll.BOFTConfig(block_size=4, butterfly_factor=3), std=0.2)
    a = layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        R = rotate(a, torch.eye(64), cayley(a.lora_T))
    torch.testing.assert_close(R @ R.T, torch.eye(64), atol=1e-5, rtol=0)
    assert int((R[0].abs() > 1e-7).sum()) == 16  # 4 · 2²


def test_boft_after_another_adapter_keeps_it_and_merges_to_the_same_model():
    """BOFT works from the incoming output, so a LoRA before it on the layer survives, hooked and merged alike."""
    model, _ = attach(ll.LoRAConfig(r=4), std=0.05)
    ll.attach(model, ll.BOFTConfig(block_size=4, butterfly_factor=2), name="b")
    perturb(model, seed=2, std=0.1, adapter="b")
    hooked = logits(model, ids())
    ll.set_active(model, "b")
    assert not torch.allclose(logits(model, ids()), hooked, atol=1e-3)  # the LoRA matters
    ll.set_active(model, ["default", "b"])
    ll.merge(model)
    torch.testing.assert_close(logits(model, ids()), hooked, rtol=0, atol=1e-5 * hooked.abs().max().item())
