"""Reliability round 2 (issue 16), the file half: save, load, import_peft and export_peft on hostile or unlucky
input (items 2, 4, 5, 6, 8, 9, the import_peft crashes, resources, messages, base fingerprints). Each test names
its item.

Written against the API every lora-lite version shares (attach/save/load on the default adapter, files edited
through their tensor keys and target lists, in format v1 or v2), so the same file runs against older code to
show it failed there.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import re
import resource
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_lite as ll
from conftest import fresh_model, make_tiny_qwen
from memory_use import peak_growth, require_rss_tracking
from model_state import assert_unchanged, fingerprint
from peft_dirs import CONFIG, WEIGHTS, edit_config, edit_weights, peft_lora_dir
from toy_models import ToyModel
from variant_cases import CASES, gsm8k_batches

Q = "model.layers.0.self_attn.q_proj"
X = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
REWRITING = sorted(n for n, m in ll.REGISTRY.items() if hasattr(m, "base_delta"))
FINGERPRINTED = sorted(n for n, m in ll.REGISTRY.items() if getattr(m, "needs_dense_weight", False))
peft_format = importlib.import_module("lora_lite.peft_format")  # the package's export_peft is the function


@torch.no_grad()
def logits(model):
    return model(input_ids=X).logits


@torch.no_grad()
def perturb(model, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=gen))


def trained(method="lora", seed=0, model=None, cfg=None):
    model = fresh_model("qwen") if model is None else model
    cfg = cfg or CASES[method].config("qwen")
    calibration = gsm8k_batches(model) if getattr(ll.REGISTRY[cfg.variant], "requires_calibration", False) else None
    ll.attach(model, cfg, calibration_data=calibration)
    perturb(model, seed)
    return model


def trainable(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if p.requires_grad and n.endswith("lora_B"))


def rewrite(path: Path, tensors=None, targets=None) -> None:
    """Edit a saved adapter file in place: tensors(dict) edits its tensors, targets(list) -> list its only adapter's
    targets. Format v1 (`targets` metadata) and v2 (`adapters` metadata) alike."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    data = load_file(str(path))
    if tensors is not None:
        tensors(data)
    if targets is not None:
        if "adapters" in meta:
            adapters = json.loads(meta["adapters"])
            (entry,) = adapters.values()
            entry["targets"] = targets(entry["targets"])
            meta["adapters"] = json.dumps(adapters)
        else:
            meta["targets"] = json.dumps(targets(json.loads(meta["targets"])))
    save_file(data, str(path), metadata=meta)


def refused(model, call, error=ll.CheckpointError, match=None) -> str:
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        call()
    assert_unchanged(model, before)
    return str(info.value)


# ---- item 2: PEFT inits that rewrote W

@pytest.mark.parametrize("init", ["lora_ga", "mica", "LoRA-GA", "olora", "corda", "loftq", "pissa_niter_4"])
def test_item2_import_refuses_inits_not_known_to_keep_the_base(init, tmp_path):
    """Item 2: LoRA-GA (like PiSSA/OLoRA/CorDA/LoftQ) rewrites W; saved without conversion it was imported and was
    off by 9-11 logits. Only inits known to leave W alone import now; unknown ones (mica) are refused too."""
    peft_dir = peft_lora_dir(tmp_path / "peft")
    edit_config(peft_dir, init_lora_weights=init)
    model = fresh_model("qwen")
    refused(model, lambda: ll.import_peft(model, peft_dir), ll.ConversionError, "init_lora_weights")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_keep_the_base_still_import(init, tmp_path):
    peft_dir = peft_lora_dir(tmp_path / "peft")
    edit_config(peft_dir, init_lora_weights=init)
    model = fresh_model("qwen")
    ll.import_peft(model, peft_dir)
    assert any(n.endswith("lora_A") for n, _ in model.named_parameters())


# ---- item 4: a NaN save over a good file

def test_item4_saving_a_nan_adapter_keeps_the_good_file(tmp_path):
    """Item 4: save wrote a NaN adapter over a good file, which was lost, and the new one could not be loaded."""
    model = trained("lora")
    path = ll.save(model, tmp_path / "adapter.safetensors")
    good = path.read_bytes()
    with torch.no_grad():
        trainable(model)[0, 0] = float("nan")
    with pytest.raises(ll.CheckpointError, match="NaN/inf"):
        ll.save(model, path)
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == [path.name]
    ll.load(fresh_model("qwen"), path)


# ---- item 5: a load racing an atomic re-save

def swap_after_first_open(monkeypatch, path: Path, replacement: bytes) -> None:
    """The first time anything opens `path`, atomically re-save it with `replacement` (as a concurrent ll.save
    would): whoever opened it keeps the old file, whoever opens the path again gets the new one."""
    real_open, real_os_open, swapped = builtins.open, os.open, []

    def after(file):
        if not swapped and isinstance(file, (str, os.PathLike)) and os.fspath(file) == os.fspath(path):
            swapped.append(True)
            ll.io.atomic_write_bytes(path, replacement)

    def patched_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        after(file)
        return f

    def patched_os_open(file, *args, **kwargs):
        fd = real_os_open(file, *args, **kwargs)
        after(file)
        return fd

    monkeypatch.setattr(builtins, "open", patched_open)
    monkeypatch.setattr(os, "open", patched_os_open)


@pytest.mark.parametrize("alpha_b", [32.0, 12345.678], ids=["same_header_length", "longer_header"])
def test_item5_load_racing_an_atomic_resave_reads_one_file_whole(alpha_b, tmp_path, monkeypatch):
    """Item 5: a load racing an atomic re-save mixed one file's config with the other's tensors (or returned
    byte-shifted tensors when the header lengths differed), with no error. Everything now comes from the one
    descriptor that was opened, so the load gives exactly file A."""
    files = {}
    for label, alpha, seed in (("a", 16.0, 0), ("b", alpha_b, 1)):
        model = trained(cfg=ll.LoRAConfig(r=2, alpha=alpha), seed=seed)
        files[label] = ll.save(model, tmp_path / f"{label}.safetensors").read_bytes()
    expected = fresh_model("qwen")
    ll.load(expected, tmp_path / "a.safetensors")
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(files["a"])
    swap_after_first_open(monkeypatch, path, files["b"])
    model = fresh_model("qwen")
    ll.load(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == files["b"], "the re-save happened during the load"
    assert torch.equal(logits(model), logits(expected))


def test_a_file_truncated_in_place_during_the_load_is_refused(tmp_path, monkeypatch):
    """An in-place overwrite (`cp` truncates first) racing the load cannot be made consistent: it is refused."""
    path = ll.save(trained("lora"), tmp_path / "a.safetensors")
    header_len = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    real_read_header = ll.validate.read_header

    def then_truncate(*args, **kwargs):
        out = real_read_header(*args, **kwargs)
        os.truncate(path, header_len)
        return out

    monkeypatch.setattr(ll.validate, "read_header", then_truncate)
    model = fresh_model("qwen")
    refused(model, lambda: ll.load(model, path), match="truncated while it was being read")


def test_big_endian_hosts_are_refused_rather_than_misread(tmp_path, monkeypatch):
    path = ll.save(trained("lora"), tmp_path / "a.safetensors")
    monkeypatch.setattr("sys.byteorder", "big")
    model = fresh_model("qwen")
    refused(model, lambda: ll.load(model, path), match="little-endian")


# ---- item 6: one layer under two names

def test_item6_a_file_naming_a_layer_also_through_hf_base_model_is_refused(tmp_path):
    """Item 6: `base_model` is a property of HF models, so get_submodule('base_model.layers.0...') reaches the
    same q_proj as 'model.layers.0...'; a file naming both adapted that layer twice. Targets now resolve only
    through the names named_modules gives, and one module named twice is refused."""
    alias = "base_" + Q
    model = fresh_model("qwen")
    assert model.get_submodule(alias) is model.get_submodule(Q)
    path = ll.save(trained(cfg=ll.LoRAConfig(r=2, target_names=(rf"{Q}$",))), tmp_path / "a.safetensors")
    rewrite(path, tensors=lambda t: t.update({"base_" + k: v.clone() for k, v in list(t.items()) if k.startswith(Q)}),
            targets=lambda targets: [*targets, alias])
    refused(model, lambda: ll.load(model, path))


def test_a_file_naming_a_layer_only_through_an_attribute_alias_is_refused(tmp_path):
    """Names that are not module names (reached through a property) are refused outright: files lora-lite writes
    always use named_modules names."""
    path = ll.save(trained(cfg=ll.LoRAConfig(r=2, target_names=(rf"{Q}$",))), tmp_path / "a.safetensors")
    rewrite(path, tensors=lambda t: t.update({"base_" + k: t.pop(k) for k in list(t) if k.startswith(Q)}),
            targets=lambda targets: ["base_" + n for n in targets])
    model = fresh_model("qwen")
    assert "not a layer lora-lite adapts in this model" in refused(model, lambda: ll.load(model, path))


class Aliased(ToyModel):
    """layers.0.q_proj also registered as `alias`."""

    def __init__(self):
        super().__init__()
        self.alias = self.layers[0].q_proj


def test_item6_a_module_registered_under_two_names_is_refused_when_a_file_names_both(tmp_path):
    model = Aliased()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"layers\.0\.q_proj$",)))
    perturb(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    prefix = "layers.0.q_proj"
    rewrite(path, tensors=lambda t: t.update({"alias" + k[len(prefix):]: v.clone() for k, v in list(t.items())}),
            targets=lambda targets: [*targets, "alias"])
    target = Aliased()
    assert "names one layer twice" in refused(target, lambda: ll.load(target, path))


# ---- item 8: huge finite values

@pytest.mark.parametrize("method", REWRITING)
def test_item8_huge_finite_frozen_factors_are_refused(method, tmp_path):
    """Item 8: a PiSSA file with A0/B0 scaled to ~1e20 (finite) wrote inf into the base weights on load. W - base_delta
    is now computed and checked before the model is touched, for every weight-rewriting method. Each tensor is scaled
    so its largest entry is 1e20 (LoRA-One's factors start near 1e-3, so a fixed factor of 1e20 would not overflow)."""
    path = ll.save(trained(method), tmp_path / "a.safetensors")
    rewrite(path, tensors=lambda t: t.update({k: v * (1e20 / v.abs().max()) for k, v in t.items() if v.any()}))
    model = fresh_model("qwen")
    refused(model, lambda: ll.load(model, path), match="non-finite weights")


def test_item8_values_beyond_the_dtype_of_the_layer_are_refused(tmp_path):
    """The hook casts adapter tensors to the layer's dtype: 1e6 is finite in the fp32 file but inf in fp16."""
    model = trained(cfg=ll.LoRAConfig(r=2))
    with torch.no_grad():
        trainable(model)[0, 0] = 1e6
    path = ll.save(model, tmp_path / "a.safetensors")
    half = fresh_model("qwen", torch.float16)
    refused(half, lambda: ll.load(half, path), match="beyond the largest torch.float16 value")
    ll.load(fresh_model("qwen"), path)


# ---- item 9: export_peft as a pair

def test_item9_an_export_interrupted_before_its_config_is_refused_on_import(tmp_path, monkeypatch):
    """Item 9: export_peft wrote new weights, then failed to write the config; import_peft accepted the new weights
    with the old config (off by 3.45). The weights now carry the config they were exported with."""
    out = tmp_path / "peft"
    ll.export_peft(trained(cfg=ll.LoRAConfig(r=2, alpha=16.0)), out)
    second = trained(cfg=ll.LoRAConfig(r=2, alpha=32.0), seed=1)
    real = peft_format.atomic_write_bytes

    def config_write_fails(path, data):
        if Path(path).name == CONFIG:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(peft_format, "atomic_write_bytes", config_write_fails)
    with pytest.raises(ll.CheckpointError, match="export again"):
        ll.export_peft(second, out)
    monkeypatch.undo()
    model = fresh_model("qwen")
    refused(model, lambda: ll.import_peft(model, out), match="not the config export_peft wrote")
    ll.export_peft(second, out)
    ll.import_peft(model, out)
    torch.testing.assert_close(logits(model), logits(second), rtol=1e-5, atol=1e-5)


# ---- crashes with raw exceptions

BAD_CONFIGS = {
    "list": b"[1, 2]",
    "non_utf8": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "x": "\xff\xfe"}',
    "huge_alpha": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1' + b"0" * 400 + b"}",
    "string": b'"LORA"',
    "nan": b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}',
    "float_r": b'{"peft_type": "LORA", "r": 4.5, "lora_alpha": 8}',
    "rslora_string": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": "yes"}',
    "duplicate_keys": b'{"peft_type": "LORA", "r": 4, "r": 8, "lora_alpha": 8}',
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_crashes_import_peft_malformed_config_is_a_checkpoint_error(case, tmp_path):
    """Crashes: a list as config, a non-UTF-8 config and lora_alpha = 10**400 raised raw exceptions."""
    peft_dir = peft_lora_dir(tmp_path / "peft")
    (peft_dir / CONFIG).write_bytes(BAD_CONFIGS[case])
    model = fresh_model("qwen")
    refused(model, lambda: ll.import_peft(model, peft_dir))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn, torch.uint8], ids=str)
def test_crashes_import_peft_non_float_tensors_are_a_checkpoint_error(dtype, tmp_path):
    peft_dir = peft_lora_dir(tmp_path / "peft")
    edit_weights(peft_dir, lambda t: t.update({k: v.to(dtype) for k, v in t.items() if "lora_A" in k}))
    model = fresh_model("qwen")
    refused(model, lambda: ll.import_peft(model, peft_dir), match="floating point")


def test_crashes_a_write_the_disk_refuses_is_a_checkpoint_error(tmp_path):
    """Crashes: a full disk surfaced as safetensors' SafetensorError. A file-size limit makes the same write fail."""
    model = trained("lora")
    path = ll.save(model, tmp_path / "adapter.safetensors")
    good = path.read_bytes()
    perturb(model, seed=1)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write gets EFBIG instead of the signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(ll.CheckpointError, match="could not write .* any previous file there is unchanged"):
            ll.save(model, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == [path.name]


# ---- resources

def test_resources_a_large_file_whose_names_fit_no_layer_is_refused_before_its_data_is_read(tmp_path):
    """Resources: a 1 GB sparse file whose tensor names fit no layer cost 1.4-1.9 GB RSS before it was refused (the
    tensors were copied before the fit check). Names, shapes and dtypes are now checked from the header first."""
    require_rss_tracking()
    path = ll.save(trained(cfg=ll.LoRAConfig(r=2, target_names=(rf"{Q}$",))), tmp_path / "a.safetensors")
    big = 256 * 2**20
    rewrite(path, targets=lambda targets: ["nowhere"])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    key = "nowhere.lora_adapters.default.lora_A" if "adapters" in meta else "nowhere.lora_A"
    header = json.dumps({"__metadata__": meta, key: {"dtype": "F32", "shape": [2, big // 8],
                                                    "data_offsets": [0, big]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + big)  # sparse: no disk blocks, but every byte reads as zero
    model = fresh_model("qwen")
    growth = peak_growth(lambda: refused(model, lambda: ll.load(model, path), match="nowhere"))
    assert growth < 64 * 2**20, f"refusing it raised peak RSS by {growth / 2**20:.0f} MiB"


def test_resources_150k_literal_target_patterns_load_without_compiling_a_regex(tmp_path, monkeypatch):
    """Resources: 150k target names in a file took 23-56 s to load, one regex compile each. Patterns of literal
    characters and escaped punctuation (what re.escape gives) are checked without the regex compiler."""
    path = ll.save(trained(cfg=ll.LoRAConfig(r=2, target_names=(rf"{Q}$",))), tmp_path / "a.safetensors")
    names = [f"^expert_{i}\\.q$" for i in range(150_000)]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if "adapters" in meta:
        adapters = json.loads(meta["adapters"])
        adapters["default"]["config"]["target_names"] = names
        meta["adapters"] = json.dumps(adapters)
    else:
        meta["config"] = json.dumps({**json.loads(meta["config"]), "target_names": names})
    save_file(load_file(str(path)), str(path), metadata=meta)
    compiler = getattr(re, "_compiler", None) or importlib.import_module("sre_compile")
    real, compiled = compiler.compile, []

    def counting(pattern, *args, **kwargs):
        if isinstance(pattern, str) and "expert_" in pattern:
            compiled.append(pattern)
        return real(pattern, *args, **kwargs)

    monkeypatch.setattr(compiler, "compile", counting)
    ll.load(fresh_model("qwen"), path)
    assert compiled == []


def test_resources_a_file_naming_more_layers_than_the_model_has_is_refused_at_once(tmp_path):
    path = ll.save(trained(cfg=ll.LoRAConfig(r=2, target_names=(rf"{Q}$",))), tmp_path / "a.safetensors")
    rewrite(path, targets=lambda targets: [*targets, *(f"model.layers.{i}.x" for i in range(150_000))])
    model = fresh_model("qwen")
    refused(model, lambda: ll.load(model, path), match="adapts 150001 layers but this model has [0-9]+ layers lora-lite can adapt")


# ---- unclear messages

def test_messages_save_to_none_names_the_problem():
    with pytest.raises(ll.CheckpointError, match="needs a file path .* got NoneType"):
        ll.save(trained("lora"), None)


def test_messages_a_legal_252_character_file_name_saves(tmp_path):
    """The temp name (`.<name>.XXXXXXXX.tmp`) used to exceed NAME_MAX for a legal long name."""
    name = "a" * 240 + ".safetensors"
    assert len(name) == 252
    model = trained("lora")
    ll.save(model, tmp_path / name)
    assert os.listdir(tmp_path) == [name]
    ll.load(fresh_model("qwen"), tmp_path / name)
    with pytest.raises(ll.CheckpointError, match="bytes; this filesystem allows"):
        ll.save(model, tmp_path / ("b" * 300))


def test_messages_save_refuses_to_replace_a_fifo(tmp_path):
    """A FIFO at the save target was silently replaced by a regular file."""
    path = tmp_path / "adapter.safetensors"
    os.mkfifo(path)
    with pytest.raises(ll.CheckpointError, match="not a regular file"):
        ll.save(trained("lora"), path)
    assert stat.S_ISFIFO(path.stat().st_mode) and os.listdir(tmp_path) == [path.name]


def test_messages_import_peft_on_a_lora_lite_file_points_to_load(tmp_path):
    """import_peft on a lora-lite file talked about pickle .bin files."""
    path = ll.save(trained("lora"), tmp_path / "a.safetensors")
    model = fresh_model("qwen")
    message = refused(model, lambda: ll.import_peft(model, path), match=r"lora-lite adapter file.*lora_lite\.load")
    assert "pickle" not in message and ".bin" not in message


def test_messages_import_peft_mentions_pickle_only_when_a_bin_file_is_there(tmp_path):
    peft_dir = peft_lora_dir(tmp_path / "peft")
    (peft_dir / WEIGHTS).rename(peft_dir / "adapter_model.bin")
    model = fresh_model("qwen")
    assert "pickle" in refused(model, lambda: ll.import_peft(model, peft_dir), match="safe_serialization=True")


# ---- base fingerprints

@pytest.mark.parametrize("method", FINGERPRINTED)
def test_fingerprint_refuses_a_same_shaped_other_base(method, tmp_path):
    """Methods that store data computed from W (from the registry: needs_dense_weight) refuse a base whose
    weights differ, and load onto the same base in another float dtype."""
    path = ll.save(trained(method), tmp_path / "a.safetensors")
    other = make_tiny_qwen(seed=1)
    refused(other, lambda: ll.load(other, path), match="saved from another base model")
    ll.load(fresh_model("qwen", torch.bfloat16), path)


def test_hook_only_adapters_carry_no_fingerprint_and_load_on_any_base(tmp_path):
    path = ll.save(trained("lora"), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert "base_fingerprint" not in f.metadata().get("adapters", "")
    ll.load(make_tiny_qwen(seed=1), path)


def test_fingerprint_of_a_fixed_weight_is_pinned():
    """Stored fingerprints must mean the same forever: the probes are integer hashes, not a seeded RNG, so these
    values hold on every machine and torch version (a change here invalidates every saved file)."""
    W = torch.sin(torch.arange(48 * 80, dtype=torch.float64)).reshape(48, 80) * 0.1
    pinned = [0.0707016315, 0.2883947550, -0.7345942238, -0.8651803923, -1.2754381992]
    assert ll.fingerprint.of_weight(W) == pytest.approx(pinned, abs=1e-6)
    assert ll.fingerprint.matches(pinned, ll.fingerprint.of_weight(W.to(torch.bfloat16)))
    assert not ll.fingerprint.matches(pinned, ll.fingerprint.of_weight(W.flip(0)))
