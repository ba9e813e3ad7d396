"""The cost harness measures what it claims: analytic MACs match a hand count and torch's FLOP counter, the
floor is the same step as an adapter row, and the memory / parameter plumbing is wired. No timing is asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lora_lite as ll
from lora_lite.cost.cli import main as cost_main
from lora_lite.cost.cli import parse_variant
from lora_lite.cost.macs import (
    added_macs,
    attention_macs,
    call_macs,
    ideal_step_ratio,
    layer_added_macs,
    linear_macs,
)
from lora_lite.cost.measure import (
    ModelShape,
    Step,
    build_model,
    cpu_peak_supported,
    peak_step_mb,
    random_batches,
    trainable_params,
)
from lora_lite.cost.peft_map import build_peft_model, peft_config
from lora_lite.runtime import adapter_layers
from lora_lite.target import find_targets
from variant_cases import CASES

# tiny_qwen (conftest): hidden 64, 4 heads × 16, 2 kv heads, intermediate 128, 2 layers. Per layer (d_in, d_out):
TINY_LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down


def test_lora_and_hra_macs_match_a_hand_count(tiny_qwen):
    r = 4
    assert layer_added_macs(ll.REGISTRY["lora"], 64, 32, ll.LoRAConfig(r=r)) == 4 * 64 + 4 + 4 * 32  # xAᵀ, ·s, ·Bᵀ
    assert layer_added_macs(ll.REGISTRY["hra"], 64, 32, ll.HRAConfig(r=r)) == 2 * 4 * 64 + 4 * 4  # xYᵀ, ·Tᵀ, ·Y
    lora_hand = 2 * sum(r * d_in + r + r * d_out for d_in, d_out in TINY_LINEARS)
    hra_hand = 2 * sum(2 * r * d_in + r * r for d_in, _ in TINY_LINEARS)
    assert added_macs(tiny_qwen, ll.LoRAConfig(r=r)) == lora_hand == 8248
    assert added_macs(tiny_qwen, ll.HRAConfig(r=r)) == hra_hand == 2 * 6 * (2 * 4 * 64) + 2 * (2 * 4 * 128) + 14 * 16
    assert linear_macs(tiny_qwen) == 2 * sum(i * o for i, o in TINY_LINEARS) + 64 * 128  # + lm_head


def test_ideal_ratio_of_lora_and_dora_matches_a_hand_count(tiny_qwen):
    """ideal = 1 + (3·ΔF + C/N) / (2·L + 3·T) on tiny_qwen, batch 2 × seq 8 (N = 16 tokens), r = 4."""
    L = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64) + 64 * 128  # + lm_head
    T = 2 * (2 * 4 * 16 * (8 + 1) / 2)  # 2 layers × (QKᵀ + PV) × 4 heads × 16 dims × 4.5 causal keys on average
    assert (linear_macs(tiny_qwen), attention_macs(tiny_qwen, seq=8)) == (L, T) == (81920, 1152)
    floor = 2 * L + 3 * T
    lora = ll.LoRAConfig(r=4)
    assert call_macs(tiny_qwen, lora) == 0
    assert ideal_step_ratio(tiny_qwen, lora, batch=2, seq=8) == pytest.approx(1 + 3 * 8248 / floor, rel=1e-12)
    # DoRA: LoRA's 8248 plus (m/n − 1)·Wx and (m/n)·LoRA, 2·d_out per layer (Σ d_out = 512 per block)
    dora = ll.DoRAConfig(r=4)
    assert added_macs(tiny_qwen, dora) == 8248 + 2 * 2 * 512
    # its detached row norm, once per call: ‖W_i‖² and W Aᵀ (d_in·d_out·(r+1)), A Aᵀ and B(A Aᵀ) (r²·(d_in+d_out)),
    # the two row sums with B (2·r·d_out); per block Σ d_in·d_out = 36864, Σ (d_in+d_out) = 1024, Σ d_out = 512
    norm = 2 * (36864 * 5 + 16 * 1024 + 2 * 4 * 512)
    assert call_macs(tiny_qwen, dora) == norm == 409600
    assert ideal_step_ratio(tiny_qwen, dora, batch=2, seq=8) == pytest.approx(
        1 + (3 * (8248 + 2048) + norm / 16) / floor, rel=1e-12)
    # rank_pattern: each layer counted at the r attach gives it (q_proj 64 -> 64 at r = 8 in both blocks)
    patterned = ll.LoRAConfig(r=4, rank_pattern={r"q_proj$": 8})
    assert added_macs(tiny_qwen, patterned) == 8248 + 2 * (8 - 4) * (64 + 1 + 64)
    dora_patterned = ll.DoRAConfig(r=4, rank_pattern={r"q_proj$": 8})
    q_norm = lambda r: 64 * 64 * (r + 1) + r * r * (64 + 64) + 2 * r * 64  # noqa: E731
    assert call_macs(tiny_qwen, dora_patterned) == norm + 2 * (q_norm(8) - q_norm(4))


class _OneLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)


def _matmul_macs_per_token(module, d_in):
    """Slope of counted matmul MACs between 8 and 24 tokens: per-call work (HRA's T, DoRA's norm) cancels."""
    counts = []
    for tokens in (8, 24):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module.proj(torch.randn(tokens, d_in))
        counts.append(counter.get_total_flops() / 2)
    return (counts[1] - counts[0]) / 16


@pytest.mark.parametrize("cfg,elementwise", [(ll.LoRAConfig(r=4), 4), (ll.HRAConfig(r=4), 0)])
def test_macs_agree_with_torch_flop_counter(cfg, elementwise):
    """The hook's matmul share is what torch counts; the rest is the elementwise multiplies it adds."""
    d_in, d_out = 48, 40
    module = _OneLinear(d_in, d_out)
    base = _matmul_macs_per_token(module, d_in)
    ll.attach(module, cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # a non-identity adapter, so nothing is skipped
    adapted = _matmul_macs_per_token(module, d_in)
    assert adapted - base == layer_added_macs(ll.REGISTRY[cfg.variant], d_in, d_out, cfg) - elementwise


def test_every_registered_variant_counts_its_macs():
    for name, variant in ll.REGISTRY.items():
        cfg = CASES[name].config("qwen")
        assert layer_added_macs(variant, 64, 128, cfg) > 0, name


def test_a_variant_without_the_hook_is_a_clear_error():
    class NoHook:
        name = "nohook"

    with pytest.raises(ll.ConfigError, match="added_macs"):
        layer_added_macs(NoHook, 64, 32, ll.LoRAConfig(r=4))


def _ids(vocab=128, batch=2, seq=8, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_floor_is_the_adapter_step_without_an_adapter(tiny_qwen):
    """Same Step for both: the floor computes the input gradient and no weight gradient; an identity adapter
    (LoRA at init, B = 0) gives the floor's loss and input gradient and adds only adapter gradients."""
    ids = _ids()
    tiny_qwen.requires_grad_(False)
    floor = Step(tiny_qwen, ids)
    assert floor.trainable == []
    x_floor = floor.train()
    assert x_floor.grad is not None and x_floor.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_qwen.parameters())

    ll.attach(tiny_qwen, ll.LoRAConfig(r=4))
    row = Step(tiny_qwen, ids)
    x_row = row.train()
    torch.testing.assert_close(x_row.grad, x_floor.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(row.forward(), floor.forward())  # both forwards now run the adapted model
    graded = {n for n, p in tiny_qwen.named_parameters() if p.grad is not None}
    assert graded and all(".lora_" in n for n in graded)
    assert {id(p) for p in row.trainable} == {id(p) for n, p in tiny_qwen.named_parameters() if ".lora_" in n}


def test_trainable_params_match_param_specs_and_peft(tiny_qwen):
    import copy

    shared = [n for n, method in ll.REGISTRY.items() if hasattr(method, "peft")]
    calibration = random_batches(tiny_qwen.config.vocab_size, 2, 2, 16, "cpu", 0)
    for spec in (f"{n}:group_size=16" if n == "road" else n for n in shared):
        cfg = parse_variant(spec, 4, None, (ll.ALL_LINEAR,))
        ours = copy.deepcopy(tiny_qwen)
        needs_data = getattr(ll.REGISTRY[cfg.variant], "requires_calibration", False)
        ll.attach(ours, cfg, calibration_data=calibration if needs_data else None)
        by_spec, counted = 0, set()  # a tensor several layers share (Lily) counts once
        for a in adapter_layers(ours).values():
            for tname, s in ll.REGISTRY[cfg.variant].param_specs(a.d_in, a.d_out, cfg).items():
                if s.trainable and not s.as_buffer and id(getattr(a, tname)) not in counted:
                    counted.add(id(getattr(a, tname)))
                    by_spec += torch.Size(s.shape).numel()
        assert len(adapter_layers(ours)) == len(find_targets(tiny_qwen, cfg))
        assert trainable_params(ours) == by_spec, spec
        names = [n for n, _, _ in find_targets(tiny_qwen, cfg)]
        peft_model, label = build_peft_model(copy.deepcopy(tiny_qwen), cfg, names)
        assert trainable_params(peft_model) == by_spec, (spec, label)


def test_peft_map_reads_each_method_s_registration():
    import peft

    assert peft_config(ll.LoRAConfig(r=4), ["q_proj"])[1] == "LoraConfig"
    assert peft_config(ll.PiSSAConfig(r=4, svd="lowrank", niter=3), ["q_proj"])[0].init_lora_weights == "pissa_niter_3"
    for name, method in ll.REGISTRY.items():
        mapped = peft_config(method.config(), ["q_proj"])
        assert (mapped is None) == (not hasattr(method, "peft")), name
        if mapped is not None:
            assert isinstance(mapped[0], peft.PeftConfig) and mapped[0].target_modules == {"q_proj"}, name


def test_parse_variant_sets_fields_and_rejects_unknown_ones():
    cfg = parse_variant("pissa:svd=lowrank,niter=2", 16, 8.0, ("q_proj$",))
    assert (cfg.r, cfg.alpha, cfg.svd, cfg.niter, cfg.target_names) == (16, 8.0, "lowrank", 2, ("q_proj$",))
    with pytest.raises(ll.ConfigError, match="nosuch"):
        parse_variant("lora:nosuch=1", 4, None, (ll.ALL_LINEAR,))
    with pytest.raises(ll.UnknownVariantError):
        parse_variant("notavariant", 4, None, (ll.ALL_LINEAR,))
    assert parse_variant("antipasto_gain:suppress_only=True", 4, None, (ll.ALL_LINEAR,)).suppress_only is True
    with pytest.raises(ll.ConfigError, match="true or false"):
        parse_variant("antipasto_gain:suppress_only=yes", 4, None, (ll.ALL_LINEAR,))


@pytest.mark.skipif(cpu_peak_supported() is not None, reason="CPU peak memory needs Linux /proc and glibc")
def test_peak_memory_tracks_the_step_and_leaves_no_grads():
    model = build_model(ModelShape(hidden=64, layers=1, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                                   vocab=4096), torch.float32, "cpu")
    ll.attach(model, ll.LoRAConfig(r=4))
    small = peak_step_mb(Step(model, _ids(4096, 1, 8)), "cpu", repeats=2)
    big = peak_step_mb(Step(model, _ids(4096, 4, 256)), "cpu", repeats=2)
    # 1024 tokens × 4096 logits × 4 B = 16 MB for the logits alone, and the step holds several such tensors
    assert 0 <= small < 8 < 16 < big
    assert all(p.grad is None for p in model.parameters())


SHAPE_1L = ModelShape(hidden=64, layers=1, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=128)


def test_cli_writes_a_table_with_every_requested_row(tmp_path, capsys):
    out = tmp_path / "cost.md"
    threads = torch.get_num_threads()
    rc = cost_main(["--threads", "1", "--hidden", "64", "--layers", "1", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                    "--head-dim", "16", "--vocab", "128", "--batch", "1", "--seq", "8", "--r", "4",
                    "--variants", "lora", "hra", "pissa:svd=lowrank", "--iters", "1", "--warmup", "0",
                    "--mem-repeats", "1", "--svd-size", "64", "--compare-peft", "--out", str(out)])
    torch.set_num_threads(threads)
    assert rc == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| *floor (frozen base, input-embedding grad only)*", "| lora",
                                                      "| hra", "| pissa"]  # lowrank is pissa's default
    assert "pissa_niter_4" in text and "HRAConfig" in text and "lowrank (niter=4)" in text
    assert all(len(r.split(" | ")) == len(rows[0].split(" | ")) for r in rows)
    header = rows[0].split(" | ")
    lora = dict(zip(header, rows[2].split(" | "), strict=True))
    assert lora["ideal"] == f"{ideal_step_ratio(build_model(SHAPE_1L, torch.float32, 'cpu'), ll.LoRAConfig(r=4), 1, 8):.3f}"
    measured = float(lora["step ÷ floor"].strip("*").split()[0])  # "**1.31**", "1.02 (tie)", "0.98 (below ...)"
    assert float(lora["÷ ideal"]) == pytest.approx(measured / float(lora["ideal"]), abs=0.011)
    assert float(lora["PEFT ÷ ideal"]) > 0


def test_attach_sides_load_what_attach_saved_and_every_side_is_measured(tiny_qwen, tmp_path):
    import copy

    from lora_lite.cost.attach_bench import SIDES, _sides, attach_load_row, render_attach

    cfg = ll.LoRAConfig(r=4)
    names = [n for n, _, _ in find_targets(tiny_qwen, cfg)]
    sides = _sides(cfg, names, tmp_path)
    attached, loaded = copy.deepcopy(tiny_qwen), copy.deepcopy(tiny_qwen)
    sides["attach"](attached)  # the first attach writes the file the load side reads
    sides["peft_attach"](copy.deepcopy(tiny_qwen))
    sides["load"](loaded)
    ours = {n: t for n, t in attached.state_dict().items() if "lora_" in n}
    assert ours and all(torch.equal(t, loaded.state_dict()[n]) for n, t in ours.items())
    peft_loaded = sides["peft_load"](copy.deepcopy(tiny_qwen))
    assert trainable_params(peft_loaded) == trainable_params(loaded) == trainable_params(attached) > 0

    row = attach_load_row(tiny_qwen, cfg, rounds=1)
    assert row["layers"] == 14 and row["label"] == "LoraConfig"
    assert all(row[s] > 0 and row[f"{s}_mb"] >= 0 for s in SIDES)
    table = render_attach([row], ["header"]).splitlines()
    assert len(table[-1].split(" | ")) == len(table[2].split(" | ")) == 13
    with pytest.raises(ll.ConfigError, match="no PEFT equivalent"):
        attach_load_row(tiny_qwen, ll.LoRAXSConfig(r=4), rounds=1)


def test_moe_table_measures_the_floor_peft_and_lora_lite_on_the_same_expert_parameters(tmp_path):
    import types

    from lora_lite.cost.moe_bench import OURS, PEFT, lora_lite_experts_config, moe_rows, peft_experts_model

    shape = ModelShape(hidden=64, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=128, experts=4, moe_intermediate=32)
    model = build_model(shape, torch.float32, "cpu")
    assert "Moe" in type(model).__name__
    # lora-lite's adapters sit on exactly the two expert parameters, each with a leading expert dim
    targets = [n for n, _, _ in find_targets(model, lora_lite_experts_config(4, None))]
    assert targets == ["model.layers.0.mlp.experts.lora_experts.gate_up_proj",
                       "model.layers.0.mlp.experts.lora_experts.down_proj"]
    args = types.SimpleNamespace(r=4, alpha=None, iters=1, warmup=0, device="cpu", clock="wall", mem_repeats=1,
                                 mem=cpu_peak_supported() is None)
    rows = {r["side"]: r for r in moe_rows(model, _ids(128, 1, 8), args)}
    assert list(rows) == ["floor", PEFT, OURS]
    # r·(d_in + d_out) per expert and per parameter: gate_up (64 -> 64) and down (32 -> 64), 4 experts
    assert rows["floor"]["trainable"] == 0
    assert rows[PEFT]["trainable"] == rows[OURS]["trainable"] == 4 * 4 * ((64 + 64) + (32 + 64))
    assert rows["floor"]["ratio"] == 1.0 and rows[PEFT]["step"] > 0 and rows[OURS]["step"] > 0

    # the two sides are one adapter: PEFT's side, trained away from zero and imported, lands on our side's layers
    # with our side's config and tensor shapes, and reproduces PEFT's outputs
    peft_model = peft_experts_model(model, 4, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    imported, ours = copy.deepcopy(model), copy.deepcopy(model)
    ll.import_peft(imported, tmp_path / "peft")
    ll.attach(ours, lora_lite_experts_config(4, None))
    theirs_layers, ours_layers = ll.runtime.adapter_layers(imported), ll.runtime.adapter_layers(ours)
    assert list(ours_layers) == targets and sorted(theirs_layers) == sorted(targets)
    for lname, a in ours_layers.items():
        b = theirs_layers[lname]
        assert (b.kind, b.cfg.r, b.cfg.scale) == (a.kind, a.cfg.r, a.cfg.scale) == ("experts", 4, a.cfg.alpha / 4)
        assert [tuple(getattr(b, t).shape) for t in b.tensor_names] == [tuple(getattr(a, t).shape) for t in a.tensor_names]
    ids = _ids(128, 2, 8)
    with torch.no_grad():
        y_peft, y_imported, y_base = (m.eval()(input_ids=ids).logits for m in (peft_model, imported, model))
    model.train()
    assert (y_peft - y_base).abs().max() > 1e-3
    assert ((y_imported - y_peft).abs().max() / y_peft.abs().max()).item() <= 1e-5


def test_cli_refuses_a_moe_table_without_experts_a_step_table_with_them_and_attach_off_cpu(capsys):
    """One-line refusals (exit 2) before any model is built."""
    assert cost_main(["--table", "moe"]) == 2
    assert "--table moe needs an MoE shape" in capsys.readouterr().err
    assert cost_main(["--preset", "qwen3-moe"]) == 2
    assert "--table moe needs an MoE shape" in capsys.readouterr().err
    assert cost_main(["--table", "attach", "--device", "cuda:0"]) == 2
    assert "--table attach measures CPU RSS" in capsys.readouterr().err
