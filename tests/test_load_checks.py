"""load() on bad files: each refusal is a LoraLiteError naming the problem, and the model is left untouched."""

from __future__ import annotations

import os
import struct

import pytest
import torch

import lora_lite as ll
from adapter_files import (
    SMALL,
    adapters_meta,
    join,
    saved_adapter,
    split,
    with_config,
    with_metadata,
    with_targets,
)
from conftest import fresh_model, make_tiny_qwen
from deploy_cases import perturb
from lora_lite.io import read_adapter_file
from lora_lite.runtime import adapter_config
from model_state import assert_unchanged, fingerprint
from variant_cases import CASES, attach_case


@pytest.fixture(scope="module")
def blob():
    return saved_adapter()


@pytest.fixture
def model():
    return fresh_model("qwen")


def refuse(model, path, data, error=ll.CheckpointError, match=None):
    """Write `data`, load it, expect `error` matching `match`, and check the model did not change."""
    if data is not None:
        path.write_bytes(data)
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        ll.load(model, path)
    assert isinstance(info.value, ll.LoraLiteError)
    assert_unchanged(model, before)
    return str(info.value)


def test_valid_file_round_trips_bit_exactly(blob, model, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(blob)
    header, _ = split(blob)
    before = fingerprint(model)
    assert ll.load(model, path) == ["default"]
    (_, _, tensors, _), = read_adapter_file(path).values()
    for key, t in tensors.items():
        name, tname = key.rsplit(".", 1)
        assert torch.equal(getattr(model.get_submodule(name).lora_adapters.default, tname), t)
    assert len(tensors) == len(header) - 1 == 8
    ll.detach(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_reloads_to_the_outputs_of_the_model_that_was_saved(name, tmp_path):
    trained = fresh_model("qwen")
    attach_case(trained, name, "qwen")
    perturb(trained, std=0.05)
    path = ll.save(trained, tmp_path / "a.safetensors")
    x = torch.randint(0, 128, (2, 5))
    loaded = fresh_model("qwen")
    ll.load(loaded, path)
    with torch.no_grad():
        expected, got = trained(x).logits, loaded(x).logits
    assert not torch.equal(expected, fresh_model("qwen")(x).logits.detach()), "the adapter must move the outputs"
    assert torch.equal(got, expected)


def test_paths_that_are_not_files(model, tmp_path):
    assert "cannot be opened" in refuse(model, tmp_path / "missing.safetensors", None)
    assert "is a directory" in refuse(model, tmp_path, None)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "not a regular file" in refuse(model, fifo, None)  # opening it would block forever
    assert "needs a file path" in refuse(model, None, None)


@pytest.mark.parametrize("make,match", [
    (lambda b: b"", "fewer than the 8-byte header length"),
    (lambda b: b[:5], "fewer than the 8-byte"),
    (lambda b: b[:100], "declares a .*-byte header"),
    (lambda b: b[:-3], "tensors cover"),
    (lambda b: b + b"\0", "tensors cover"),
    (lambda b: struct.pack("<Q", 2**63) + b[8:], "declares a 9223372036854775808-byte header"),
    (lambda b: struct.pack("<Q", 2**64 - 1) + b[8:], "declares"),
    (lambda b: struct.pack("<Q", 4) + b"\xff\xfe{}" + b[12:], "not valid JSON"),
    (lambda b: struct.pack("<Q", 2) + b"[]", "JSON list, expected an object"),
    (lambda b: struct.pack("<Q", 13) + b'{"a":1,"a":1}', "not valid JSON"),
    (lambda b: struct.pack("<Q", 6) + b"[NaN] ", "not valid JSON"),
], ids=["empty", "5-bytes", "cut-header", "cut-data", "trailing", "huge-len", "max-len", "utf8", "list", "dup",
        "nan-literal"])
def test_broken_containers(blob, model, tmp_path, make, match):
    refuse(model, tmp_path / "a.safetensors", make(blob), match=match)


def _edit_entry(blob, **changes):
    header, data = split(blob)
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key].update(changes)
    return join(header, data)


@pytest.mark.parametrize("changes,match", [
    (dict(dtype="I64"), "adapter tensors are floating point"),
    (dict(dtype="BOOL"), "adapter tensors are floating point"),
    (dict(dtype="F16"), "needs .* bytes but its offsets"),
    (dict(shape=[-1, 64]), "list of at most 8 sizes"),
    (dict(shape=[2.0, 64]), "list of at most 8 sizes"),
    (dict(shape=[2**40, 2**40]), "needs .* bytes"),
    (dict(data_offsets=[0, 2**62]), "needs .* bytes"),
    (dict(data_offsets=[0]), "expected \\[begin, end\\]"),
    (dict(extra=1), "must be an object with keys"),
])
def test_bad_tensor_entries(blob, model, tmp_path, changes, match):
    refuse(model, tmp_path / "a.safetensors", _edit_entry(blob, **changes), match=match)


def test_overlapping_and_gapped_offsets(blob, model, tmp_path):
    header, data = split(blob)
    first, second = sorted(k for k in header if k.endswith("lora_A"))[:2]  # same shape (2, 64)
    assert header[first]["shape"] == header[second]["shape"]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    refuse(model, tmp_path / "a.safetensors", join(header, data), match="overlap or leave a gap")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(blob, model, tmp_path, value):
    header, data = split(blob)
    key = sorted(k for k in header if k != "__metadata__")[0]
    begin = header[key]["data_offsets"][0]
    data = data[:begin] + struct.pack("<f", value) + data[begin + 4:]
    refuse(model, tmp_path / "a.safetensors", join(header, data), match="NaN/inf values of")


@pytest.mark.parametrize("meta,match", [
    (dict(format=None), "not a lora-lite adapter"),
    (dict(format="peft"), "not a lora-lite adapter"),
    (dict(format_version=None), "format_version None"),
    (dict(format_version="3"), "format_version '3'"),
    (dict(adapters=None), "lacks the 'adapters'"),
    (dict(adapters="{"), "adapters metadata is not valid JSON"),
    (dict(adapters="[" * 100_000 + "]" * 100_000), "not valid JSON"),   # nesting bomb
    (dict(adapters=[1, 2]), "expected an object of adapters"),
    (dict(adapters={}), "expected an object of adapters"),
    (dict(adapters={"default": 1}), "must be an object with keys"),
    (dict(format_version="1"), "lacks the 'config'"),
])
def test_bad_metadata(blob, model, tmp_path, meta, match):
    refuse(model, tmp_path / "a.safetensors", with_metadata(blob, **meta), match=match)


@pytest.mark.parametrize("targets,match", [
    ("model.layers.0", "expected a non-empty list"),
    ({"a": 1}, "expected a non-empty list"),
    ([], "expected a non-empty list"),
    (["model.layers.0.self_attn.q_proj"] * 2, "names a module twice"),
])
def test_bad_targets(blob, model, tmp_path, targets, match):
    refuse(model, tmp_path / "a.safetensors", with_targets(blob, targets), match=match)


def test_adapter_names_and_keys_must_agree(blob, model, tmp_path):
    adapters = adapters_meta(blob)
    renamed = with_metadata(blob, adapters={"bad.name": adapters["default"]})
    refuse(model, tmp_path / "a.safetensors", renamed, match="is not 1-64 letters")
    other = with_metadata(blob, adapters={"other": adapters["default"]})
    refuse(model, tmp_path / "a.safetensors", other, match="adapter in its metadata")


@pytest.mark.parametrize("fields,error,match", [
    (dict(variant="no_such_variant"), ll.UnknownVariantError, "not registered"),
    (dict(variant="ia3"), ll.CheckpointError, "unknown fields \\['alpha', 'r'\\]"),
    (dict(variant=...), ll.CheckpointError, "no 'variant' string"),
    (dict(r="2"), ll.CheckpointError, "LoRAConfig.r must be int"),
    (dict(r=True), ll.CheckpointError, "LoRAConfig.r must be int"),
    (dict(r=-2), ll.CheckpointError, "r must be a positive int"),
    (dict(r=2**40), ll.CheckpointError, "below 2\\*\\*31"),
    (dict(r=2.0), ll.CheckpointError, "LoRAConfig.r must be int"),
    (dict(alpha="16"), ll.CheckpointError, "alpha must be float"),
    (dict(alpha=float("nan")), ll.CheckpointError, "not valid JSON"),
    (dict(alpha=1e400), ll.CheckpointError, "not valid JSON"),    # json writes Infinity
    (dict(dtype="int8"), ll.CheckpointError, "dtype 'int8' is not one of"),
    (dict(dtype=["float32"]), ll.CheckpointError, "dtype \\['float32'\\] is not one of"),
    (dict(target_names=[1]), ll.CheckpointError, "target_names must be"),
    (dict(target_names=["("]), ll.CheckpointError, "not a valid regular expression"),
    (dict(layers=[0, "1"]), ll.CheckpointError, "layers must be"),
    (dict(layers=[-1]), ll.CheckpointError, "negative index"),
    (dict(target_roles=["everything"]), ll.CheckpointError, "allowed roles"),
    (dict(surprise=1), ll.CheckpointError, "unknown fields \\['surprise'\\]"),
    (dict(r=3), ll.CheckpointError, "has shape .* but this model needs"),
    (dict(r=65), ll.CheckpointError, "has shape .* but this model needs"),  # LoRA takes any r; the file has 2
    (dict(dtype="bfloat16"), ll.CheckpointError, "expected torch.bfloat16 for all"),
])
def test_bad_config_fields(blob, model, tmp_path, fields, error, match):
    refuse(model, tmp_path / "a.safetensors", with_config(blob, **fields), error=error, match=match)


def test_lists_are_accepted_where_tuples_are_declared(blob, model, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(with_config(blob, layers=[0, 1], target_roles=[]))
    ll.load(model, path)
    assert adapter_config(model).layers == (0, 1) and adapter_config(model).target_roles == ()
    ll.detach(model)


def _rename_layer(blob, old, new):
    header, data = split(blob)
    header = {k.replace(old, new): v for k, v in header.items()}
    targets = [t.replace(old, new) for t in adapters_meta(blob)["default"]["targets"]]
    return with_targets(join(header, data), targets)


@pytest.mark.parametrize("old,new,match", [
    ("layers.1.self_attn.v_proj", "layers.7.self_attn.v_proj", "not a layer lora-lite adapts in this model"),
    ("layers.1.self_attn.v_proj", "layers.1.input_layernorm", "not a layer lora-lite adapts in this model"),
    ("model.layers.1.self_attn.v_proj", "lm_head", "has shape"),  # the head can be named; 64 -> 128
    ("layers.1.self_attn.v_proj", "layers.1.mlp.up_proj", "has shape"),   # 64 -> 128, not 64 -> 32
])
def test_targets_that_do_not_fit_this_model(blob, model, tmp_path, old, new, match):
    refuse(model, tmp_path / "a.safetensors", _rename_layer(blob, old, new), match=match)


def test_tensor_keys_must_match_targets(blob, model, tmp_path):
    header, data = split(blob)
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key.replace("lora_A", "lora_Z")] = header.pop(key)
    refuse(model, tmp_path / "a.safetensors", join(header, data), match="unexpected tensors .*lora_Z")


def test_mixed_dtypes_within_a_layer(model, tmp_path):
    trained = fresh_model("qwen")
    ll.attach(trained, ll.LoRAConfig(**SMALL))
    adapter = trained.get_submodule("model.layers.0.self_attn.q_proj").lora_adapters.default
    adapter.lora_B.data = adapter.lora_B.data.double()
    ll.save(trained, tmp_path / "a.safetensors")
    refuse(model, tmp_path / "a.safetensors", None, match="have dtypes .*float32.*float64")


def test_file_for_a_deeper_model(model, tmp_path):
    deeper = make_tiny_qwen(layers=3)
    path = tmp_path / "a.safetensors"
    path.write_bytes(saved_adapter(ll.LoRAConfig(**SMALL), deeper))
    refuse(model, path, None, match="layers.2.* not a layer lora-lite adapts in this model")


def test_load_onto_a_model_that_has_an_adapter_of_that_name(blob, model, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(blob)
    ll.attach(model, ll.IA3Config())
    before = fingerprint(model)
    with pytest.raises(ll.AttachStateError, match="already attached; pick another name"):
        ll.load(model, path)
    assert fingerprint(model)["modules"] == before["modules"]
    assert ll.load(model, path, name="second") == ["second"]
    assert ll.adapter_names(model) == ["default", "second"]
    ll.detach(model)


@pytest.mark.timeout(60)
def test_hostile_regex_in_config_is_refused_before_it_runs(blob, model, tmp_path):
    """'(.|.)*!' backtracks for minutes on a module name: the config check refuses it (lora_lite.patterns), and
    load never runs the config's regexes anyway (targets are resolved by their exact names)."""
    refuse(model, tmp_path / "a.safetensors", with_config(blob, target_names=["(.|.)*!"]),
           match="invalid config: target_names entry .* exponential time")


def test_loaded_tensors_do_not_map_the_file(blob, model, tmp_path):
    """Overwriting the file in place after load (cp truncates first) must not crash training (SIGBUS)."""
    path = tmp_path / "a.safetensors"
    path.write_bytes(blob)
    ll.load(model, path)
    os.truncate(path, 0)
    x = torch.randint(0, 128, (1, 5))
    loss = model(x, labels=x).loss
    loss.backward()
    ll.detach(model)


def test_nan_found_anywhere_in_a_large_tensor(tmp_path):
    from lora_lite.validate import check_values

    for position in (0, 7, 8, 4095, 500_000, 999_999):
        for value in (float("nan"), float("inf"), -float("inf")):
            t = torch.randn(1_000_000)
            t[position] = value
            with pytest.raises(ll.CheckpointError, match="1 NaN/inf values of 1000000"):
                check_values({"x.lora_A": t}, tmp_path)
    check_values({"x.lora_A": torch.randn(1_000_000), "x.lora_B": torch.empty(0, 3)}, tmp_path)
