"""The LoRA-family options and inits of issue 15: rsLoRA (use_rslora), LoRA+ (lora_plus_groups), LoRA-FA against
PEFT's LoRA-FA optimizer, and the factor properties the OLoRA and MiLoRA papers state."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import ids, logits, perturb, rel_err
from lora_lite.cost.peft_map import build_peft_model
from lora_lite.runtime import adapter_layers
from variant_cases import CASES, attach_case, gsm8k_batches

WITH_RSLORA = sorted(n for n, m in ll.REGISTRY.items() if "use_rslora" in {f.name for f in dataclasses.fields(m.config)})


def flip_rslora(src, dst):
    """The adapter file `src` with use_rslora switched on in its config, tensors untouched."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    adapters = json.loads(meta["adapters"])
    for entry in adapters.values():
        entry["config"]["use_rslora"] = True
    save_file(load_file(str(src)), str(dst), metadata={**meta, "adapters": json.dumps(adapters)})
    return dst


@pytest.mark.parametrize("name", WITH_RSLORA)
def test_use_rslora_changes_the_output_or_is_refused(name, tmp_path):
    """A knob every LowRankConfig has: each method either scales by alpha/√r, or refuses it before attaching."""
    cfg = CASES[name].config("qwen")
    model = fresh_model("qwen")
    try:
        attach_case(model, name, "qwen", cfg=dataclasses.replace(cfg, use_rslora=True))
        refused = None
    except ll.ConfigError as e:
        refused = e
    if refused is not None:
        assert "use_rslora" in str(refused) and ll.adapter_names(model) == []
    model = fresh_model("qwen")
    attach_case(model, name, "qwen", cfg=cfg)
    perturb(model, std=0.02)
    plain = flip_rslora(ll.save(model, tmp_path / "plain.safetensors"), tmp_path / "rs.safetensors")
    flipped = fresh_model("qwen")
    if refused is not None:
        with pytest.raises(ll.CheckpointError, match="use_rslora"):  # load wraps the method's check
            ll.load(flipped, plain)
        return
    ll.load(flipped, plain)
    assert ll.runtime.adapter_config(flipped).use_rslora
    assert rel_err(logits(flipped, ids()), logits(model, ids())) > 1e-3, f"{name} ignores use_rslora"


def test_rslora_scale_is_alpha_over_sqrt_r_and_matches_peft():
    cfg = ll.LoRAConfig(r=16, alpha=8, use_rslora=True)
    assert cfg.scale == 2.0 and ll.LoRAConfig(r=16, alpha=8).scale == 0.5
    base = fresh_model("qwen")
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    theirs, _ = build_peft_model(copy.deepcopy(base), cfg, list(adapter_layers(ours)))
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == cfg.scale


def two_loras(cfg):
    """Our adapter and PEFT's on copies of one base, with the same random non-identity tensors."""
    base = fresh_model("qwen")
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    layers = adapter_layers(ours)
    theirs, _ = build_peft_model(copy.deepcopy(base), cfg, list(layers))
    pairs = []  # (tensor name, our tensor, PEFT's)
    torch.manual_seed(0)
    with torch.no_grad():
        for lname, a in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(lname)
            for tname, attr in (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("lora_m", "lora_magnitude_vector")):
                if tname in a.tensor_names:
                    mine, peft_t = getattr(a, tname), getattr(peft_layer, attr)["default"].weight
                    mine.add_(torch.randn_like(mine) * 0.05)
                    peft_t.copy_(mine)
                    pairs.append((tname, mine, peft_t))
    return ours, theirs, pairs


@pytest.mark.parametrize("cfg", [ll.LoRAConfig(r=4, alpha=8), ll.DoRAConfig(r=4, alpha=8)], ids=["lora", "dora"])
def test_lora_plus_groups_give_every_tensor_peft_s_learning_rate(cfg):
    optimizers = pytest.importorskip("peft.optimizers")
    ours, theirs, pairs = two_loras(cfg)
    ours_lr = {id(p): g["lr"] for g in ll.lora_plus_groups(ours, lr=1e-3, ratio=16) for p in g["params"]}
    opt = optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    theirs_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(ours_lr) == len(theirs_lr) == len(pairs)
    assert all(ours_lr[id(mine)] == theirs_lr[id(peft_t)] for _, mine, peft_t in pairs)
    assert sorted(set(ours_lr.values())) == [1e-3, 1.6e-2]


def test_lora_plus_trains_like_peft_and_with_any_optimizer():
    optimizers = pytest.importorskip("peft.optimizers")
    ours, theirs, _ = two_loras(ll.LoRAConfig(r=4, alpha=8))
    (b,) = gsm8k_batches(ours, n_batches=1, batch_size=2, max_length=16)
    opts = [torch.optim.AdamW(ll.lora_plus_groups(ours, lr=1e-3, ratio=16, weight_decay=0.01)),
            optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                                 loraplus_weight_decay=0.01)]
    for _ in range(3):
        for model, opt in zip((ours, theirs), opts, strict=True):
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
    assert rel_err(logits(ours, ids()), logits(theirs, ids())) <= 1e-5
    # plain SGD: the step of B is exactly ratio times what one learning rate gives
    a = next(iter(adapter_layers(ours).values()))
    before = {t: getattr(a, t).detach().clone() for t in ("lora_A", "lora_B")}
    ours(**b).loss.backward()
    grads = {t: getattr(a, t).grad.clone() for t in before}
    torch.optim.SGD(ll.lora_plus_groups(ours, lr=0.1, ratio=16)).step()
    assert torch.allclose(a.lora_A - before["lora_A"], -0.1 * grads["lora_A"], atol=1e-7)
    assert torch.allclose(a.lora_B - before["lora_B"], -1.6 * grads["lora_B"], atol=1e-6)


def test_lora_plus_refuses_methods_without_b_and_models_without_adapters():
    model = fresh_model("qwen")
    with pytest.raises(ll.AttachStateError, match="no adapter"):
        ll.lora_plus_groups(model, lr=1e-3)
    ll.attach(model, ll.IA3Config())
    ll.attach(model, ll.LoRAXSConfig(r=4), name="xs")  # its B is a frozen buffer
    ll.attach(model, ll.LoRAConfig(r=4), name="plain")
    with pytest.raises(ll.ConfigError, match=r"\['ia3', 'lora_xs'\] train no lora_B"):
        ll.lora_plus_groups(model, lr=1e-3)
    assert len(ll.lora_plus_groups(model, lr=1e-3, name="plain")) == 2
    with pytest.raises(ll.ConfigError, match="ratio"):
        ll.lora_plus_groups(model, lr=1e-3, ratio=0)


def test_lora_plus_lists_a_tensor_several_layers_share_once():
    """Lily ties one A into the layers of a group and one B into the layers of a group: each is one Parameter,
    so it must be in one optimizer group once (torch warns on duplicates and would step it twice per group)."""
    model = fresh_model("qwen")
    attach_case(model, "lily", "qwen")
    groups = ll.lora_plus_groups(model, lr=1e-3)
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    assert len(set(listed)) < sum(len([t for t in a.tensor_names if getattr(a, t).requires_grad])
                                  for a in adapter_layers(model).values()), "nothing is shared: the test is vacuous"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.AdamW(groups)


def test_lora_fa_trains_what_peft_lorafa_trains_and_its_optimizer_only_adds_a_preconditioner():
    """PEFT's create_lorafa_optimizer freezes A, as lora_fa does, and preconditions B's gradient by (s² A Aᵀ)⁻¹.
    With orthonormal rows in A and s = 1 that is the identity, so its step equals a plain (HF-style) AdamW step
    on our B; with a random A it is not (measured: 9e-4 vs 1.9, relative to the step). PEFT computes the
    preconditioned gradient under bf16 autocast on CPU, hence the 1e-2 tolerance."""
    optimizers = pytest.importorskip("peft.optimizers")
    from peft.optimizers.lorafa import LoraFAOptimizer

    def step(orthonormal: bool):
        ours, theirs, pairs = two_loras(ll.LoRAFAConfig(r=4, alpha=4))
        if orthonormal:
            with torch.no_grad():
                for tname, mine, peft_t in pairs:
                    if tname == "lora_A":
                        mine.copy_(torch.linalg.qr(mine.T)[0].T)
                        peft_t.copy_(mine)
        peft_opt = optimizers.create_lorafa_optimizer(theirs, r=4, lora_alpha=4, lr=1e-3)
        assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == \
            sum(p.numel() for p in ours.parameters() if p.requires_grad)
        bs = [p for p in ours.parameters() if p.requires_grad]
        plain = LoraFAOptimizer([{"params": bs, "names": [f"b{i}" for i in range(len(bs))],
                                  "scaling_factors": [None] * len(bs)}], lr=1e-3)
        (b,) = gsm8k_batches(ours, n_batches=1, batch_size=2, max_length=16)
        before = [(mine.detach().clone(), peft_t.detach().clone()) for _, mine, peft_t in pairs]
        for model, opt in ((ours, plain), (theirs, peft_opt)):
            model(**b).loss.backward()
            opt.step()
        moves = {}
        for (tname, mine, peft_t), (m0, p0) in zip(pairs, before, strict=True):
            moves.setdefault(tname, []).append((mine - m0, peft_t - p0))
        assert all(not dm.any() and not dp.any() for dm, dp in moves["lora_A"]), "A moved"
        return max(rel_err(dm, dp) for dm, dp in moves["lora_B"])

    assert step(orthonormal=True) <= 1e-2
    assert step(orthonormal=False) > 0.1


def test_olora_b_is_orthonormal_and_the_adapter_holds_w_s_first_r_columns():
    """W = QR: B0 = Q_r has orthonormal columns, A0 = R_r is upper triangular in its first r columns, so with
    s = 1 the adapter takes W's first r columns whole and W_res is zero there."""
    model = fresh_model("qwen")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ll.attach(model, ll.OLoRAConfig(r=4, alpha=4))
    for lname, a in adapter_layers(model).items():
        B0, A0 = a.lora_B0, a.lora_A0
        assert torch.allclose(B0.T @ B0, torch.eye(4), atol=1e-5)
        assert torch.count_nonzero(torch.tril(A0[:, :4], diagonal=-1)) == 0
        assert a.base.weight[:, :4].abs().max() <= 1e-6 * original[lname].abs().max()
        assert torch.allclose(a.base.weight[:, 4:] + (B0 @ A0)[:, 4:], original[lname][:, 4:], atol=1e-6)


def test_milora_takes_the_minor_singular_components_and_leaves_the_principal_ones():
    model = fresh_model("qwen")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    r = 4
    ll.attach(model, ll.MiLoRAConfig(r=r, alpha=8))
    for lname, a in adapter_layers(model).items():
        _, S, Vh = torch.linalg.svd(original[lname], full_matrices=False)
        k = S.numel()
        taken = a.cfg.scale * a.lora_B0 @ a.lora_A0
        assert torch.allclose(torch.linalg.svdvals(taken)[:r], S[k - r:], rtol=1e-4, atol=1e-6)
        assert torch.allclose(torch.linalg.svdvals(a.base.weight)[:k - r], S[:k - r], rtol=1e-4)
        assert (a.lora_A0 @ Vh[:k - r].T).abs().max() <= 1e-4 * math.sqrt(S[0])  # orthogonal to the principal
