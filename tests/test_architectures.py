"""Every model family users bring (tests/families.py), adapted by LoRA as a new user would, against PEFT 0.21.
(The issue's fifteen, plus GPT-OSS, whose experts are stored transposed with biases.)

For each family:
  - what lora-lite and PEFT adapt under all-linear; where they differ, the difference is the documented one
    (ONLY_OURS / ONLY_PEFT below: PEFT's v5 MoE conversion, dead or crashing layers lora-lite leaves out);
  - forward parity with a PEFT model holding the same values (fp32, 1e-5 relative), also of the gradients;
  - a few training steps in which every adapter tensor (and every trained head parameter) gets a gradient;
  - save -> load onto a fresh base gives bit-identical outputs; merge gives the hooked outputs;
  - export_peft -> PeftModel.from_pretrained gives the same outputs, and import_peft of that directory too.
    DeepSeek-V3's dense and shared-expert MLPs are refused by export_peft (PEFT's loader would drop them), so
    that family also checks the refusal and exports the rest.
The lists and the largest differences are printed in the terminal summary.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import lora_lite as ll
from families import BY_NAME, FAMILIES, Family
from lora_lite.runtime import adapter_extras, adapter_layers
from peft_side import all_linear, ours_adapted, peft, peft_adapted, peft_like

RTOL = 1e-5
TRAIN_STEPS = 3
IDS = [f.name for f in FAMILIES]

# What one side adapts under all-linear and the other does not, and why. Every name in a difference must match its
# family's pattern, and every pattern must match something: the lists are exactly the known gaps.
ONLY_PEFT = {
    # PEFT's transformers-v5 MoE conversion adds the router's weight as a target parameter; the router is a custom
    # module returning (logits, weights, indices), not a linear layer lora-lite can adapt through its call
    "qwen3_moe": r"\.mlp\.gate\.weight$",
    "mixtral": r"\.mlp\.gate\.weight$",
    "deepseek_v3": r"\.mlp\.gate\.weight$",
    "phimoe": r"\.mlp\.router$",  # an nn.Linear returning a tuple: PEFT's adapter crashes at the first forward
    "vit": r"^classifier$",  # the task head: lora-lite trains it whole instead (modules_to_save)
    "siglip": r"^head\.attention\.out_proj$",  # nn.MultiheadAttention never calls out_proj: a dead adapter
    "resnet_conv2d": r"^classifier\.1$",  # the task head again; all-linear has nothing else (no convs) to take
}
ONLY_OURS = {
    # PEFT re-reads the dense (layer 0) and shared-expert MLP targets as expert parameters and drops them
    "deepseek_v3": r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj$",
    "phimoe": r"\.mlp\.experts\.(gate_up|down)_proj$",  # PEFT's all-linear adds experts only for models it converts
    "gpt_oss": r"\.mlp\.experts\.(gate_up|down)_proj$",
}
SUMMARY: dict[str, str] = {}


class ArchitectureSummary:
    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", f"architectures vs PEFT {peft.__version__} (LoRA, fp32)")
        for key in sorted(SUMMARY):
            terminalreporter.write_line(f"{key:40s} {SUMMARY[key]}")


@pytest.fixture(scope="module")
def summary(request):
    if not request.config.pluginmanager.has_plugin("lora_lite_architectures"):
        request.config.pluginmanager.register(ArchitectureSummary(), "lora_lite_architectures")
    return SUMMARY


def attached(fam: Family, base=None, **overrides):
    model = copy.deepcopy(base if base is not None else fam.build())
    cfg = fam.config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ll.errors.SkippedLayersWarning)
        ll.attach(model, cfg)
    return model


@torch.no_grad()
def perturb(model, seed=0):
    """Non-identity values in every adapter tensor and trained head (B alone would leave A's gradient at zero)."""
    g = torch.Generator().manual_seed(seed)
    for a in adapter_layers(model).values():
        a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * 0.3)
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.05)
    for e in adapter_extras(model):
        for p in ll.extras.own_parameters(e.base).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def run(fam: Family, model, grad=False):
    with torch.set_grad_enabled(grad):
        return fam.output(model(**fam.inputs())).float()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def differences(fam: Family, ours: set[str], theirs: set[str]) -> None:
    for side, names, pattern in (("lora-lite", ours - theirs, ONLY_OURS.get(fam.name)),
                                 ("PEFT", theirs - ours, ONLY_PEFT.get(fam.name))):
        unexplained = sorted(n for n in names if pattern is None or not re.search(pattern, n))
        assert not unexplained, f"{fam.name}: only {side} adapts {unexplained} under all-linear"
        if pattern is not None:
            assert names, f"{fam.name}: the known gap {pattern!r} ({side} only) is gone; update the table"


def test_the_table_of_gaps_names_real_families():
    assert set(ONLY_PEFT) | set(ONLY_OURS) <= set(BY_NAME)


@pytest.mark.parametrize("name", IDS)
def test_all_linear_lists(name, summary):
    fam = BY_NAME[name]
    base = fam.build()
    try:
        mine = ours_adapted(attached(fam, base, target_names=(ll.ALL_LINEAR,), modules_to_save=()))
    except ll.TargetError as e:  # all-linear found nothing it can adapt, and said what it left out
        assert "all-linear left out" in str(e)
        mine = set()
    theirs = all_linear(base, fam.peft_task)
    summary[f"{name} all-linear"] = (f"both {len(mine & theirs)}, only lora-lite {sorted(mine - theirs)[:3]}"
                                     f"{'...' if len(mine - theirs) > 3 else ''}, only PEFT "
                                     f"{sorted(theirs - mine)[:3]}{'...' if len(theirs - mine) > 3 else ''}")
    differences(fam, mine, theirs)


@pytest.mark.parametrize("name", IDS)
def test_forward_and_gradient_parity_with_peft(name, summary):
    fam = BY_NAME[name]
    base = fam.build()
    ours = attached(fam, base, **_shared_with_peft(fam))
    perturb(ours)
    theirs = peft_like(base, ours, fam.peft_task)
    assert peft_adapted(theirs) == ours_adapted(ours), "PEFT did not adapt the layers it was given"
    y_ours, y_theirs = run(fam, ours, grad=True), run(fam, theirs, grad=True)
    assert rel(y_ours, run(fam, base)) > 1e-4, "the adapter is at identity: the comparison is vacuous"
    err = rel(y_ours, y_theirs)
    assert err <= RTOL, f"{name}: outputs differ from PEFT's by {err:.3g} relative"
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()) and len(grads) == len(theirs_grads)
    total = sum(g.abs().sum() for g in grads.values())
    theirs_total = sum(g.abs().sum() for g in theirs_grads.values() if g is not None)
    g_err = (abs(total - theirs_total) / theirs_total).item()
    assert g_err <= RTOL, f"{name}: summed |gradients| differ from PEFT's by {g_err:.3g} relative"
    summary[f"{name} parity"] = f"outputs {err:.2g}, summed |grad| {g_err:.2g} ({len(adapter_layers(ours))} layers)"


def _shared_with_peft(fam: Family) -> dict:
    """Config overrides that leave out what PEFT cannot hold (DeepSeek-V3's dense and shared MLPs)."""
    if fam.peft_drops is None:
        return {}
    return {"exclude_names": fam.config().exclude_names + (fam.peft_drops,)}


@pytest.mark.parametrize("name", IDS)
def test_training_reaches_every_adapter_tensor(name, tmp_path):
    fam = BY_NAME[name]
    torch.manual_seed(0)
    model = attached(fam)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")}
    trained |= {f"{m}.{p}" for m, mod in model.named_modules() for p in ll.extras.own_parameters(mod)
                if ll.extras.SAVED in mod.__dict__}
    assert set(params) == trained, "something other than the adapter and its trained heads would train"
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    target = torch.randn_like(run(fam, model))
    reached = set()
    for _ in range(TRAIN_STEPS):
        (run(fam, model, grad=True) - target).square().mean().backward()
        reached |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
        opt.zero_grad()
    assert reached == set(params), f"{name}: no gradient reached {sorted(set(params) - reached)[:5]}"


@pytest.mark.parametrize("name", IDS)
def test_save_load_and_merge(name, tmp_path):
    fam = BY_NAME[name]
    base = fam.build()
    model = attached(fam, base)
    perturb(model)
    hooked = run(fam, model)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(run(fam, fresh), hooked), f"{name}: reloaded outputs differ"
    ll.merge(fresh)
    assert not list(adapter_layers_any(fresh))
    err = rel(run(fam, fresh), hooked)
    assert err <= RTOL, f"{name}: merged outputs differ from the hooked ones by {err:.3g}"
    ll.detach(model)
    assert torch.equal(run(fam, model), run(fam, base)), f"{name}: detach did not restore the base"


def adapter_layers_any(model):
    return [m for m in model.modules() if isinstance(m, ll.Adapter)] + ll.extras.iter_extras(model)


@pytest.mark.parametrize("name", IDS)
def test_export_to_peft_and_back(name, tmp_path, summary):
    fam = BY_NAME[name]
    base = fam.build()
    if fam.peft_drops is not None:  # all-linear includes layers PEFT's loader would drop: refused before writing
        model = attached(fam, base)
        with pytest.raises(ll.ConversionError, match="would be dropped"):
            ll.export_peft(model, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    model = attached(fam, base, **_shared_with_peft(fam))
    perturb(model)
    hooked = run(fam, model)
    ll.export_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about weights it does not load: fail on it
        warnings.filterwarnings("ignore", message=".*(fan_in_fan_out|kernels).*")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    err = rel(run(fam, theirs), hooked)
    assert err <= RTOL, f"{name}: PEFT's reload of the export differs by {err:.3g}"
    again = copy.deepcopy(base)
    ll.import_peft(again, tmp_path / "peft")
    back = rel(run(fam, again), hooked)
    assert back <= RTOL, f"{name}: import_peft of the export differs by {back:.3g}"
    summary[f"{name} export"] = f"PEFT reload {err:.2g}, import_peft {back:.2g}"
