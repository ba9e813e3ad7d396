"""Property-based fuzzing of import_peft(): malformed PEFT directories built from a valid one PEFT wrote.

For every generated directory: only a LoraLiteError may escape, the model is bit-identical afterwards (also
after a successful import + detach), and peak memory (RSS high-water mark, Linux) grows by less than
MEMORY_BOUND. Covered: adapter_config.json with fields of every JSON type set, deleted or invented, replaced by
other JSON values or by bytes that are not UTF-8 or not JSON; the weights file with random bytes, truncation,
wrong header lengths and byte flips, header entries with other dtypes (integers, bool, float8), shapes,
offsets (huge declared sizes included), deleted, copied or renamed keys; well-formed files whose tensors were
renamed (modules that do not exist, names that are not LoRA weights), dropped, added, retyped or reshaped;
tensor values with NaN/inf (refused) or finite extremes.

Derandomized with no example database, so CI sees the same 280 examples every time (120 config + 120 weights
+ 40 values); each test asserts that many really ran.
"""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_lite as ll
from adapter_files import join, split
from conftest import fresh_model
from memory_use import peak_growth, require_rss_tracking
from model_state import assert_unchanged, fingerprint
from peft_dirs import CONFIG, WEIGHTS, peft_lora_dir

MEMORY_BOUND = 64 * 2**20
RUNS: dict[str, int] = {}


def fuzz_settings(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_rss_tracking()
    peft_dir = peft_lora_dir(tmp_path_factory.mktemp("fuzz_peft") / "adapter")
    config, weights = (peft_dir / CONFIG).read_bytes(), (peft_dir / WEIGHTS).read_bytes()
    model = fresh_model("qwen")
    ll.import_peft(model, peft_dir)  # warm up every code path once, so lazy allocations do not count as growth
    ll.detach(model)
    return model, fingerprint(model), peft_dir, config, weights


def import_and_check(env, config: bytes, weights: bytes, test: str) -> ll.LoraLiteError | None:
    """Import a directory holding these two files; return the LoraLiteError it raised (None if it imported)."""
    RUNS[test] = RUNS.get(test, 0) + 1
    model, before, peft_dir = env[:3]
    (peft_dir / CONFIG).write_bytes(config)
    (peft_dir / WEIGHTS).write_bytes(weights)
    error = []

    def run():
        try:
            ll.import_peft(model, peft_dir)
        except ll.LoraLiteError as e:
            error.append(e)

    growth = peak_growth(run)
    if not error:
        ll.detach(model)
    assert_unchanged(model, before)
    assert growth < MEMORY_BOUND, f"import of a {len(weights)}-byte file raised peak RSS by {growth / 2**20:.0f} MiB"
    return error[0] if error else None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "use_rslora", "init_lora_weights", "target_modules", "bias",
                 "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_dropout", "fan_in_fan_out",
                 "layers_to_transform", "task_type", "surprise"]
plausible = (st.integers(-4, 70) | st.floats(-100, 100) | st.booleans()
             | st.sampled_from(["LORA", "IA3", "none", "all", "pissa", "lora_ga", "gaussian", "q_proj"])
             | st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head"]), max_size=2))


# ---- adapter_config.json: 120 examples

def config_files(valid: bytes):
    def edited(edits):
        conf = json.loads(valid)
        for key, value in edits:
            if value is ...:
                conf.pop(key, None)
            else:
                conf[key] = value
        return json.dumps(conf).encode()

    edit = st.tuples(st.sampled_from(CONFIG_FIELDS), plausible | json_values | st.just(...))
    return st.one_of(
        st.lists(edit, min_size=1, max_size=3).map(edited),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=256),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=4)).map(
            lambda cut: valid[:cut[0]] + cut[1] + valid[cut[0]:]),
    )


def test_config(env):
    @fuzz_settings(120)
    @given(st.data())
    def run(data):
        import_and_check(env, data.draw(config_files(env[3])), env[4], "config")
    run()
    assert RUNS["config"] >= 120


# ---- adapter_model.safetensors: 120 examples

KEYS = st.sampled_from([
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
    "base_model.model.lm_head.lora_A.weight", "base_model.model.model.norm.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.embed_tokens.lora_embedding_A", "model.layers.0.self_attn.q_proj.lora_A.weight",
]) | st.text(max_size=20)


def mutate(draw, header: dict, data: bytes) -> tuple[dict, bytes]:
    keys = sorted(k for k in header if k != "__metadata__")
    op = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "copy", "huge", "meta"]))
    key = draw(st.sampled_from(keys)) if keys else None
    if op == "dtype" and key:
        header[key]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I8", "I64", "U8", "BOOL", "F8_E4M3"])
                                    | json_values)
    elif op == "shape" and key:
        header[key]["shape"] = draw(st.lists(st.integers(-3, 300), max_size=3) | json_values)
    elif op == "offsets" and key:
        header[key]["data_offsets"] = draw(st.lists(st.integers(-3, 2**64), min_size=2, max_size=2) | json_values)
    elif op == "huge" and key:
        header[key]["shape"] = [draw(st.integers(2**31, 2**40)), 64]
    elif op == "drop" and key:
        del header[key]
    elif op in ("rename", "copy") and key:
        moved = header[key] if op == "copy" else header.pop(key)
        header[draw(KEYS)] = dict(moved)
    elif op == "meta":
        header["__metadata__"] = draw(st.dictionaries(st.sampled_from(["format", "lora_lite_export_config", "x"]),
                                                      st.text(max_size=20) | json_values.map(json.dumps)) | json_values)
    if draw(st.integers(0, 7)) == 5:
        data = data[:draw(st.integers(0, len(data)))] + b"\0" * draw(st.integers(0, 64))
    return header, data


TENSOR_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
                 torch.float8_e4m3fn]


def edit_tensors(draw, valid: bytes) -> bytes:
    """A well-formed safetensors file whose tensors were renamed, dropped, added, retyped or reshaped, so the
    checks against the model (names, shapes, dtypes, A/B pairs) are reached."""
    tensors = safetensors.torch.load(valid)
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(tensors)
        op = draw(st.sampled_from(["rename", "drop", "add", "dtype", "shape"]))
        key = draw(st.sampled_from(keys)) if keys else None
        if op == "rename" and key:
            tensors[draw(KEYS)] = tensors.pop(key)
        elif op == "drop" and key:
            del tensors[key]
        elif op == "add":
            tensors[draw(KEYS)] = torch.zeros(draw(st.lists(st.integers(0, 70), min_size=1, max_size=2)))
        elif op == "dtype" and key:
            tensors[key] = tensors[key].to(draw(st.sampled_from(TENSOR_DTYPES)))
        elif op == "shape" and key:
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 70), max_size=3)))
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def weight_files(draw, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["tensors"] * 4 + ["header"] * 3 + ["bytes", "truncate", "header_len", "flip"]))
    if kind == "tensors":
        return edit_tensors(draw, valid)
    if kind == "bytes":
        return draw(st.binary(max_size=4096))
    if kind == "truncate":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "header_len":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + valid[8:]
    if kind == "flip":
        b = bytearray(valid)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8)):
            b[pos % len(b)] = value
        return bytes(b)
    header, payload = split(valid)
    for _ in range(draw(st.integers(1, 2))):
        header, payload = mutate(draw, header, payload)
    return join(header, payload)


def test_weights(env):
    @fuzz_settings(120)
    @given(st.data())
    def run(data):
        import_and_check(env, env[3], weight_files(data.draw, env[4]), "weights")
    run()
    assert RUNS["weights"] >= 120


# ---- tensor values: 40 examples. NaN/inf is refused with CheckpointError; finite fp32 values import.

def test_values(env):
    header, payload = split(env[4])
    keys = sorted(k for k in header if k != "__metadata__")
    special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0, 1e-45])

    @fuzz_settings(40)
    @given(st.sampled_from(keys), st.lists(st.tuples(st.integers(0, 10**6), special | st.floats(width=32)),
                                           min_size=1, max_size=4))
    def run(key, writes):
        assert header[key]["dtype"] == "F32"
        begin, end = header[key]["data_offsets"]
        b = bytearray(payload)
        n = (end - begin) // 4
        for index, value in writes:
            struct.pack_into("<f", b, begin + 4 * (index % n), value)
        values = torch.frombuffer(b[begin:end], dtype=torch.float32)
        error = import_and_check(env, env[3], join(header, bytes(b)), "values")
        if torch.isfinite(values).all():
            assert error is None
        else:
            assert isinstance(error, ll.CheckpointError) and "NaN/inf" in str(error)
    run()
    assert RUNS["values"] >= 40
