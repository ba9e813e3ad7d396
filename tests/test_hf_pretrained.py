"""transformers' save_pretrained on an adapted model, and lora_lite.hf's adapter directories.

The trap (issue 13): model.save_pretrained() wrote the base weights (W_res for PiSSA) plus lora_* keys that
from_pretrained dropped as "unexpected", so the reloaded model was the base, or for PiSSA neither base nor adapted,
without an error. attach now makes model.save_pretrained refuse with the calls to use (lora_lite/save_guard.py);
lora_lite.hf.save_pretrained / from_pretrained write and rebuild the adapter; merge first gives a plain model that
saves normally.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lora_lite as ll
import lora_lite.hf as llhf
from conftest import fresh_model
from deploy_cases import ids, logits, perturb
from model_state import assert_unchanged, fingerprint
from variant_cases import CASES, attach_case

METHODS = sorted(ll.REGISTRY)


def adapted_with_saved_base(name: str, tmp_path):
    """(adapted tiny Qwen with a perturbed adapter, the directory its base was saved to).

    The adapted model's base is loaded from that directory, as a rebuilt one's is: from_pretrained hands back
    weights that are not 64-byte aligned, and on CPU DoRA's W·Aᵀ then takes another kernel path (one ulp off)."""
    base_dir = tmp_path / "base"
    fresh_model("qwen").save_pretrained(base_dir)  # no adapter: transformers' own save, unguarded
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)  # the method's random init does not depend on earlier tests
    attach_case(model, name, "qwen")
    perturb(model)
    return model, base_dir


@pytest.mark.parametrize("name", METHODS)
def test_save_pretrained_refuses_and_the_adapter_directory_rebuilds_the_model(name, tmp_path):
    model, base_dir = adapted_with_saved_base(name, tmp_path)
    with pytest.raises(ll.AttachStateError, match=r"lora_lite\.hf\.save_pretrained\(model, .*lora_lite\.merge"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    path = llhf.save_pretrained(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [llhf.ADAPTER_FILE]
    assert path.stat().st_size == ll.save(model, tmp_path / "plain.safetensors").stat().st_size
    rebuilt = llhf.from_pretrained(base_dir, tmp_path / "adapter")
    assert ll.adapter_names(rebuilt) == ["default"]
    err = (logits(rebuilt, ids()) - logits(model, ids())).abs().max().item()
    assert err <= CASES[name].reload_atol, f"{name}: the rebuilt model is {err:.3g} away"


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_the_trap_the_refusal_prevents(name, tmp_path):
    """What transformers' own save_pretrained (called past the guard) gives back: lora's adapter is gone (the
    base), PiSSA's reload is neither the base nor the adapted model, and only an info log says so."""
    model, base_dir = adapted_with_saved_base(name, tmp_path)
    type(model).save_pretrained(model, tmp_path / "whole")
    reloaded = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "whole"), ids())
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir), ids())
    adapted = logits(model, ids())
    assert (reloaded - adapted).abs().max() > 1e-2
    if name == "pissa":
        assert (reloaded - base).abs().max() > 1e-2  # W_res alone
    else:
        assert torch.equal(reloaded, base)


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_a_merged_model_saves_normally(name, tmp_path):
    model, _ = adapted_with_saved_base(name, tmp_path)
    expected = logits(model, ids())
    ll.merge(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(reloaded, ids()) - expected).abs().max() <= 1e-4


def test_the_guard_travels_with_copies_and_detach_removes_it():
    model = fresh_model("qwen")
    before = fingerprint(model)
    ll.attach(model, ll.PiSSAConfig(r=4))
    for clone in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        with pytest.raises(ll.AttachStateError, match="pissa in place of the original W"):
            clone.save_pretrained("never-written")
    with pytest.raises(ll.AttachStateError):
        torch.compile(copy.deepcopy(model)).save_pretrained("never-written")  # forwarded to the guarded model
    ll.detach(model)
    assert "save_pretrained" not in vars(model)
    assert_unchanged(model, before)


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_from_pretrained_says_what_a_directory_holds_instead(tmp_path):
    model, base_dir = adapted_with_saved_base("lora", tmp_path)
    with pytest.raises(ll.CheckpointError, match="whole-model weights"):
        llhf.from_pretrained(base_dir, base_dir)
    ll.export_peft(model, tmp_path / "peft")
    with pytest.raises(ll.CheckpointError, match="PEFT adapter.*import_peft"):
        llhf.from_pretrained(base_dir, tmp_path / "peft")
    with pytest.raises(ll.ConfigError, match="hub id or local path.*lora_lite.load"):
        llhf.from_pretrained(model, tmp_path / "peft")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ll.CheckpointError, match="needs a directory"):
        llhf.save_pretrained(model, tmp_path / "file")


def test_import_lora_lite_leaves_transformers_unimported():
    code = "import sys, lora_lite; assert 'transformers' not in sys.modules, 'lora_lite imported transformers'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
