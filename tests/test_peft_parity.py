"""Parity with HF PEFT (0.21.x) for every variant we share with it.

Same base (tiny Qwen3 with random biases, fp32), PEFT's model built from the equivalent each method registers
(`peft` in its file, through lora_lite.cost.peft_map), same adapter tensors: ours are set to random non-identity
values (pairs broken, gates away from 1) and copied into PEFT's modules, mapping names and layouts (PEFT's
hra_u is our lora_U transposed, its ia3_l is (d_out, 1) or (1, d_in)). Logits and the gradient of every adapter
tensor must agree within 1e-5 relative. The largest absolute differences are printed in the terminal summary.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from lora_lite.cost.peft_map import build_peft_model
from lora_lite.variant import rewrites_weight
from variant_cases import gsm8k_batches

peft = pytest.importorskip("peft")

RTOL = 1e-5
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_DIFFS: dict[str, tuple[float, float]] = {}  # id -> (logits, grads)


@dataclass(frozen=True)
class Pair:
    ours: Callable[[], ll.AdapterConfig]
    # our tensor name -> (PEFT's module-attribute name, ours->theirs layout, theirs->ours layout)
    tensors: dict[str, tuple[str, Callable, Callable]]
    randomize: Callable[[str, torch.Tensor, torch.nn.Module], torch.Tensor]
    frozen: tuple[str, ...] = ()  # copied like the others, but frozen on both sides: neither may get a gradient
    init_check: bool = False  # PEFT's own init of the rewritten base and of A, B must equal ours


def same(t):
    return t


def factors(tname, t, layer):
    return torch.randn_like(t) * (0.3 if tname == "lora_A" else 0.05)


def dora_values(tname, t, layer):
    if tname == "lora_m":
        return layer.base.weight.norm(dim=1) * (1 + 0.2 * torch.randn_like(t))
    return factors(tname, t, layer)


def delora_values(tname, t, layer):
    return torch.tensor([2.5]) if tname == "lora_lambda" else factors(tname, t, layer)


def gate_values(tname, t, layer):
    return 1 + 0.3 * torch.randn_like(t)


def road_values(tname, t, layer):
    return 0.5 * torch.randn_like(t) + (1.0 if tname == "lora_road_alpha" else 0.0)


LORA_AB = {"lora_A": ("lora_A", same, same), "lora_B": ("lora_B", same, same)}
LOHA = {"lora_B1": ("hada_w1_a", same, same), "lora_A1": ("hada_w1_b", same, same),
        "lora_B2": ("hada_w2_a", same, same), "lora_A2": ("hada_w2_b", same, same)}
LOKR = {"lora_w1": ("lokr_w1", same, same), "lora_w2": ("lokr_w2", same, same),
        "lora_w2_a": ("lokr_w2_a", same, same), "lora_w2_b": ("lokr_w2_b", same, same)}


def road_pair(variant):
    return Pair(lambda: ll.RoadConfig(road_variant=variant, group_size=8),
                {"lora_road_theta": ("road_theta", same, same), "lora_road_alpha": ("road_alpha", same, same)},
                road_values)


def miss_pair(mode):
    return Pair(lambda: ll.MiSSConfig(r=4, mode=mode, mini_r=8), {"lora_D": ("miss_block", same, same)},
                lambda n, t, layer: 0.02 * torch.randn_like(t))


PAIRS = {
    "lora": Pair(lambda: ll.LoRAConfig(r=4, alpha=5), LORA_AB, factors),
    "dora": Pair(lambda: ll.DoRAConfig(r=4, alpha=5), {**LORA_AB, "lora_m": ("lora_magnitude_vector", same, same)},
                 dora_values),
    "pissa": Pair(lambda: ll.PiSSAConfig(r=4, alpha=5, svd="full"), LORA_AB, factors,  # PEFT's "pissa": exact SVD
                  init_check=True),
    "delora": Pair(lambda: ll.DeLoRAConfig(r=4, lambda0=1.0),
                   {"lora_A": ("delora_A", same, same), "lora_B": ("delora_B", same, same),
                    "lora_lambda": ("delora_lambda", same, same)}, delora_values),
    "ia3": Pair(lambda: ll.IA3Config(), {"lora_g": ("ia3_l", lambda t: t[:, None], lambda t: t[:, 0])}, gate_values),
    "ia3_ff": Pair(lambda: ll.IA3FFConfig(), {"lora_g": ("ia3_l", lambda t: t[None, :], lambda t: t[0])}, gate_values),
    "hra": Pair(lambda: ll.HRAConfig(r=4), {"lora_U": ("hra_u", lambda t: t.T, lambda t: t.T)},
                lambda n, t, layer: torch.randn_like(t)),
    "road_1": road_pair("road_1"),
    "road_2": road_pair("road_2"),
    "road_4": road_pair("road_4"),
    # methods-2: Lily .. BOFT
    "lily": Pair(lambda: ll.LilyConfig(r=4, stride_a=2, num_b=3),
                 {"lora_A": ("lily_A", same, same), "lora_router": ("lily_router", same, same),
                  "lora_B": ("lily_B", lambda t: t.flatten(0, 1), lambda t: t.reshape(3, 4, -1))},
                 lambda n, t, layer: torch.randn_like(t) * (0.05 if n == "lora_B" else 0.5)),
    "hira": Pair(lambda: ll.HiRAConfig(r=4), {"lora_A": ("hira_A", same, same), "lora_B": ("hira_B", same, same)},
                 lambda n, t, layer: torch.randn_like(t) * (0.3 if n == "lora_A" else 1.0)),
    "shira": Pair(lambda: ll.SHiRAConfig(r=4, seed=7), {"lora_values": ("shira_weight", same, same)},
                  lambda n, t, layer: 0.05 * torch.randn_like(t)),
    "miss": miss_pair("miss"),
    "miss_mini": miss_pair("mini"),
    "miss_bat": miss_pair("bat"),
    "gralora": Pair(lambda: ll.GraLoRAConfig(r=4, alpha=6.0, k=2), {"lora_A": ("gralora_A", same, same),
                                                                     "lora_B": ("gralora_B", same, same)}, factors),
    "gralora_hybrid": Pair(lambda: ll.GraLoRAConfig(r=4, alpha=6.0, k=2, hybrid_r=2),
                           {"lora_A": ("gralora_A", same, same), "lora_B": ("gralora_B", same, same),
                            "lora_hybrid_A": ("gralora_A_general", same, same),
                            "lora_hybrid_B": ("gralora_B_general", same, same)}, factors),
    "loha": Pair(lambda: ll.LoHaConfig(r=4, alpha=6.0),
                 LOHA,
                 lambda n, t, layer: 0.3 * torch.randn_like(t)),
    "loha_dense": Pair(lambda: ll.LoHaConfig(r=8, alpha=6.0),  # r² (d_in + d_out) > d_in d_out: PEFT's dense form
                       LOHA,
                       lambda n, t, layer: 0.3 * torch.randn_like(t)),
    # the tiny Qwen's 64- and 32-wide layers get a full W2, its 128-wide ones a rank-r W2a W2b
    "lokr": Pair(lambda: ll.LoKrConfig(r=4, alpha=6.0),
                 LOKR,
                 lambda n, t, layer: 0.3 * torch.randn_like(t)),
    "oft": Pair(lambda: ll.OFTConfig(block_size=8), {"lora_q": ("oft_R", same, same)},
                lambda n, t, layer: 0.1 * torch.randn_like(t)),
    "oft_cayley": Pair(lambda: ll.OFTConfig(block_size=8, cayley_neumann=False), {"lora_q": ("oft_R", same, same)},
                       lambda n, t, layer: 0.1 * torch.randn_like(t)),
    # PEFT runs one butterfly factor without its CUDA extension, so parity is for one; test_structured_methods
    # checks the permutations of more factors against PEFT's own
    "boft": Pair(lambda: ll.BOFTConfig(block_size=4), {"lora_T": ("boft_R", same, same),
                                                       "lora_s": ("boft_s", lambda t: t[:, None], lambda t: t[:, 0])},
                 lambda n, t, layer: (0.1 if n == "lora_T" else 1.0) * torch.randn_like(t) + (n == "lora_s")),
    "vera": Pair(lambda: ll.VeRAConfig(r=8), {"lora_d": ("vera_lambda_d", same, same),
                                              "lora_b": ("vera_lambda_b", same, same)},
                 lambda n, t, layer: (0.1 if n == "lora_d" else 1.0) * torch.randn_like(t)),
    # methods-1 (issue 15, first half)
    "lora_rslora": Pair(lambda: ll.LoRAConfig(r=4, alpha=5, use_rslora=True), LORA_AB, factors),
    "pissa_rslora": Pair(lambda: ll.PiSSAConfig(r=4, alpha=5, svd="full", use_rslora=True), LORA_AB, factors,
                         init_check=True),
    "lora_fa": Pair(lambda: ll.LoRAFAConfig(r=4, alpha=5), LORA_AB, factors, frozen=("lora_A",)),
    "olora": Pair(lambda: ll.OLoRAConfig(r=4, alpha=5), LORA_AB, factors, init_check=True),
    # PEFT's lora_ga init differs from the paper's (lora_ga.py), so only the rewritten base is shared
    "lora_ga": Pair(lambda: ll.LoRAGAConfig(r=4, alpha=5), LORA_AB, factors),
    # rsLoRA on methods-2's LowRankConfig methods: PEFT's LyCORIS layers have no use_rslora, so alpha carries it
    "loha_rslora": Pair(lambda: ll.LoHaConfig(r=4, alpha=6.0, use_rslora=True), LOHA,
                        lambda n, t, layer: 0.3 * torch.randn_like(t)),
    "lokr_rslora": Pair(lambda: ll.LoKrConfig(r=4, alpha=6.0, use_rslora=True), LOKR,
                        lambda n, t, layer: 0.3 * torch.randn_like(t)),
}


def test_every_method_with_a_peft_equivalent_has_a_parity_pair():
    shared = {name for name, method in ll.REGISTRY.items() if hasattr(method, "peft")}
    assert {pair.ours().variant for pair in PAIRS.values()} == shared


def in_layer(pair: Pair, layer) -> list:
    """The pair's tensor mappings that apply to this layer (LoKr's W2 is full on some layers, factored on others)."""
    return [(tname, spec) for tname, spec in pair.tensors.items() if tname in layer.tensor_names]


def forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach()


class ParitySummary:
    """A plugin registered on first use, so the numbers reach the terminal summary (fixture output is captured)."""

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", f"PEFT {peft.__version__} parity: largest absolute difference (fp32)")
        for key, (dl, dg) in sorted(MAX_DIFFS.items()):
            what = f"W_res, A, B {dl:.3g}" if key.endswith(" init") else f"logits {dl:.3g}   adapter grads {dg:.3g}"
            terminalreporter.write_line(f"{key:18s} {what}")


@pytest.fixture(scope="module")
def summary(request):
    if not request.config.pluginmanager.has_plugin("lora_lite_peft_parity"):
        request.config.pluginmanager.register(ParitySummary(), "lora_lite_peft_parity")
    return MAX_DIFFS


def rel_err(a, b) -> tuple[float, float]:
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("key", sorted(PAIRS))
def test_matches_peft(key, summary):
    pair = PAIRS[key]
    base = fresh_model("qwen")
    (b,) = gsm8k_batches(base, n_batches=1, batch_size=2, max_length=16)
    batch = {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
    ours = copy.deepcopy(base)
    needs_data = getattr(ll.REGISTRY[pair.ours().variant], "requires_calibration", False)
    ll.attach(ours, pair.ours(), calibration_data=gsm8k_batches(base) if needs_data else None)
    layers = ll.runtime.adapter_layers(ours)
    assert layers, "no adapted layers"
    theirs, _ = build_peft_model(copy.deepcopy(base), pair.ours(), list(layers))

    if rewrites_weight(ll.REGISTRY[pair.ours().variant]):
        init_diff = 0.0
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            for ours_t, theirs_t in ((layer.base.weight, peft_layer.base_layer.weight),
                                     (layer.lora_A, peft_layer.lora_A["default"].weight),
                                     (layer.lora_B, peft_layer.lora_B["default"].weight)):
                diff, rel = rel_err(ours_t, theirs_t)
                init_diff = max(init_diff, diff)
                assert rel <= RTOL or not pair.init_check, f"{key} init of {name} differs from PEFT's by {diff:.3g}"
            with torch.no_grad():  # the same residual on both sides, so only the adapter forward is compared
                peft_layer.base_layer.weight.copy_(layer.base.weight)
        if pair.init_check:
            summary[f"{key} init"] = (init_diff, float("nan"))

    for name, layer in layers.items():
        trained = {t for t in layer.tensor_names if getattr(layer, t).requires_grad}
        assert trained <= set(pair.tensors), f"{name}: no PEFT counterpart for {sorted(trained - set(pair.tensors))}"
    torch.manual_seed(1)
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            for tname, (attr, to_theirs, _) in in_layer(pair, layer):
                value = pair.randomize(tname, getattr(layer, tname), layer).to(getattr(layer, tname).dtype)
                getattr(layer, tname).copy_(value)
                target = getattr(peft_layer, attr)["default"]
                target = target.weight if isinstance(target, torch.nn.Module) else target
                target.copy_(to_theirs(value))

    logits_ours, logits_theirs = forward_backward(ours, batch), forward_backward(theirs, batch)
    with torch.no_grad():
        logits_base = base(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (logits_ours - logits_base).abs().max() > 1e-3, "the adapter is still at identity: the test is vacuous"
    max_logit, rel_logit = rel_err(logits_ours, logits_theirs)
    assert rel_logit <= RTOL, f"{key}: logits differ by {max_logit:.3g} ({rel_logit:.3g} relative)"
    max_grad = 0.0
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for tname, (attr, _, to_ours) in in_layer(pair, layer):
            target = getattr(peft_layer, attr)["default"]
            target = target.weight if isinstance(target, torch.nn.Module) else target
            if tname in pair.frozen:
                assert not getattr(layer, tname).requires_grad and not target.requires_grad, f"{name}.{tname}"
                continue
            g_ours, g_theirs = getattr(layer, tname).grad, to_ours(target.grad)
            assert g_ours is not None and g_theirs is not None, f"{name}.{tname}: missing gradient"
            assert g_theirs.abs().max() > 0, f"{name}.{tname}: zero gradient, nothing to compare"
            diff, rel = rel_err(g_ours, g_theirs)
            max_grad = max(max_grad, diff)
            assert rel <= RTOL, f"{key}: grad of {name}.{tname} differs by {diff:.3g} ({rel:.3g} relative)"
    summary[key] = (max_logit, max_grad)
    print(f"PEFT parity {key}: max |logits diff| {max_logit:.3g}, max |grad diff| {max_grad:.3g}")
