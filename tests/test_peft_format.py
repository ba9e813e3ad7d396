"""export_peft writes a PEFT LoRA that PeftModel.from_pretrained reproduces on the original base; import_peft
reads a PEFT LoRA as our lora variant. Errors printed as `MEASURED export_peft <variant> <value>`.
"""

from __future__ import annotations

import json

import pytest
import torch

import lora_lite as ll
from conftest import fresh_model
from deploy_cases import exportable, ids, logits, rel_err, trained
from variant_cases import CASES

peft = pytest.importorskip("peft")
EXPORTABLE = [n for n in sorted(CASES) if exportable(n)]
NOT_EXPORTABLE = [n for n in sorted(CASES) if not exportable(n)]


def peft_logits(peft_dir, x, dtype=torch.float32):
    model = peft.PeftModel.from_pretrained(fresh_model("qwen", dtype), str(peft_dir))
    return logits(model.eval(), x)


@pytest.mark.parametrize("case", EXPORTABLE)
def test_export_matches_peft_on_the_original_base(case, tmp_path):
    model = trained(case)
    x = ids()
    ours = logits(model, x)
    assert rel_err(logits(fresh_model("qwen"), x), ours) > 1e-3
    ll.export_peft(model, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    first = next(iter(ll.runtime.adapter_layers(model).values()))
    rank = first.variant.lora_factors(first)[0].shape[0]  # e.g. 2r for pissa, k for antipasto_ablate
    assert (conf["peft_type"], conf["r"], conf["bias"], conf["use_dora"]) == ("LORA", rank, "none", False)
    err = rel_err(peft_logits(tmp_path, x), ours)
    print(f"MEASURED export_peft {case} {err:.2e}")
    assert err <= 1e-5


def test_export_names_leaf_modules_when_they_select_exactly_our_layers(tmp_path):
    model = fresh_model("qwen")
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$", r"v_proj$")))
    ll.export_peft(model, tmp_path / "leaves")
    assert json.loads((tmp_path / "leaves" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    ll.detach(model)
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), layers=(1,)))
    ll.export_peft(model, tmp_path / "paths")
    conf = json.loads((tmp_path / "paths" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("case", NOT_EXPORTABLE)
def test_export_refuses_full_rank_changes(case, tmp_path):
    with pytest.raises(ll.ConversionError, match="not low-rank.*merge"):
        ll.export_peft(trained(case), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def peft_lora(tmp_path, dtype=torch.float32, **lora_kwargs):
    """A PEFT LoRA on the tiny Qwen with random (nonzero) B, saved to tmp_path; returns (dir, its logits)."""
    base = fresh_model("qwen", dtype)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora_kwargs}
    model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path))
    return tmp_path, logits(model.eval(), ids())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_import_reproduces_peft(rslora, tmp_path):
    peft_dir, expected = peft_lora(tmp_path, use_rslora=rslora)
    model = fresh_model("qwen")
    ll.import_peft(model, peft_dir)
    cfg = ll.runtime.adapter_config(model)
    assert cfg.variant == "lora" and cfg.r == 4 and len(ll.runtime.adapter_layers(model)) == 6
    assert (cfg.alpha, cfg.use_rslora) == (8, rslora)  # rsLoRA is kept as the option, not folded into alpha
    err = rel_err(logits(model, ids()), expected)
    print(f"MEASURED import_peft {'rslora' if rslora else 'lora'} {err:.2e}")
    assert err <= 1e-5
    # and back out again: export -> PEFT gives the same model
    ll.export_peft(model, tmp_path / "again")
    assert rel_err(peft_logits(tmp_path / "again", ids()), expected) <= 1e-5


def test_import_bf16_adapter_is_upcast_like_peft(tmp_path):
    """Stored in fp32 like PEFT's autocast_adapter_dtype; computed in bf16, where PEFT upcasts the layer input to
    fp32 for the adapter path, so the two agree to bf16 rounding, not bit for bit."""
    peft_dir, expected = peft_lora(tmp_path, dtype=torch.bfloat16)
    model = fresh_model("qwen", torch.bfloat16)
    ll.import_peft(model, peft_dir)
    assert model.model.layers[0].self_attn.q_proj.lora_adapters.default.lora_A.dtype == torch.float32
    err = rel_err(logits(model, ids()), expected)
    print(f"MEASURED import_peft bf16 {err:.2e}")
    assert err <= 2e-2  # bf16 rounding of the adapter path; bf16 alone moves this base's logits by ~6e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_import_refuses_what_it_cannot_reproduce(kwargs, match, tmp_path):
    peft_dir, _ = peft_lora(tmp_path, **kwargs)
    model = fresh_model("qwen")
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ll.ConversionError, match=match):
        ll.import_peft(model, peft_dir)
    assert ll.adapter_names(model) == []
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())


def test_import_refuses_unconverted_pissa_and_missing_files(tmp_path):
    peft_dir, _ = peft_lora(tmp_path / "p", init_lora_weights="pissa")
    with pytest.raises(ll.ConversionError, match="path_initial_model_for_weight_conversion"):
        ll.import_peft(fresh_model("qwen"), peft_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ll.CheckpointError, match="adapter_config.json"):
        ll.import_peft(fresh_model("qwen"), tmp_path / "empty")


def test_import_refuses_non_finite_values(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_dir, _ = peft_lora(tmp_path)
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    next(v for k, v in weights.items() if "lora_B" in k)[0, 0] = float("nan")
    save_file(weights, str(peft_dir / "adapter_model.safetensors"))
    model = fresh_model("qwen")
    with pytest.raises(ll.CheckpointError, match="NaN/inf"):
        ll.import_peft(model, peft_dir)
    assert ll.adapter_names(model) == []


@pytest.mark.parametrize("rotate", ["U", "both"])
def test_export_antipasto_rotating_the_output_basis(rotate, tmp_path):
    """The matrix case rotates V only; the closed-form core must also hold when U is rotated."""
    model = trained("antipasto", cfg=ll.AntiPaSTOConfig(r=8, rotate_basis=rotate))
    x = ids()
    ours = logits(model, x)
    ll.export_peft(model, tmp_path)
    assert rel_err(peft_logits(tmp_path, x), ours) <= 1e-5
