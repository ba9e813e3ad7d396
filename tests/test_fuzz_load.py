"""Property-based fuzzing of load(): malformed adapter files from a valid one.

For every generated file: only a LoraLiteError may escape, the model is bit-identical afterwards (also after
a successful load + detach), and peak memory (RSS high-water mark, Linux) grows by less than MEMORY_BOUND.
Covered: random bytes, truncation, wrong header length, byte flips; header entries with wrong dtypes, shapes,
offsets and huge declared sizes; deleted/renamed/invented keys (layers that do not exist); wrong or missing
metadata and config fields of every JSON type; NaN/inf tensor values (refused, see docs/errors.md).

The runs are derandomized and use no example database, so CI sees the same 560 examples every time
(160 byte-level + 240 header + 80 value + 80 huge-size); each test asserts that many really ran.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_lite as ll
from adapter_files import join, saved_adapter, split
from conftest import fresh_model
from memory_use import peak_growth, require_rss_tracking
from model_state import assert_unchanged, fingerprint

MEMORY_BOUND = 64 * 2**20


def fuzz_settings(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_rss_tracking()
    model = fresh_model("qwen")
    blob = saved_adapter()
    path = tmp_path_factory.mktemp("fuzz") / "adapter.safetensors"
    path.write_bytes(blob)
    ll.load(model, path)  # warm up every code path once, so lazy allocations do not count as growth
    ll.detach(model)
    return model, fingerprint(model), blob, path


RUNS: dict[str, int] = {}


def load_and_check(env, data: bytes, test: str) -> ll.LoraLiteError | None:
    """Load `data`; return the LoraLiteError it raised (None if it loaded). Checks model and memory."""
    RUNS[test] = RUNS.get(test, 0) + 1
    model, before, _, path = env
    path.write_bytes(data)
    errors = []

    def run():
        try:
            ll.load(model, path)
        except ll.LoraLiteError as e:
            errors.append(e)

    growth = peak_growth(run)
    error = errors[0] if errors else None
    if error is None:
        ll.detach(model)
    assert_unchanged(model, before)
    assert growth < MEMORY_BOUND, f"load of a {len(data)}-byte file raised peak RSS by {growth / 2**20:.0f} MiB"
    return error


# ---- byte level: 160 examples

def _with_header_len(blob, n):
    return struct.pack("<Q", n) + blob[8:]


def _flip(blob, edits):
    b = bytearray(blob)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b)


def byte_files(blob):
    header_len = int.from_bytes(blob[:8], "little")
    return st.one_of(
        st.binary(max_size=4096),
        st.integers(0, len(blob) - 1).map(lambda n: blob[:n]),
        st.integers(0, 2**64 - 1).map(lambda n: _with_header_len(blob, n)),
        st.integers(-64, 64).map(lambda d: _with_header_len(blob, max(0, header_len + d))),
        st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda edits: _flip(blob, edits)),
        st.binary(max_size=64).map(lambda tail: blob[:8 + header_len] + tail),
    )


def test_bytes(env):
    @fuzz_settings(160)
    @given(st.data())
    def run(data):
        load_and_check(env, data.draw(byte_files(env[2])), "bytes")
    run()
    assert RUNS["bytes"] >= 160


# ---- header structure: 240 examples

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
sizes = st.integers(-3, 2**64) | st.integers(0, 300)
layer_names = st.sampled_from([
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.5.self_attn.q_proj",
    "model.layers.0.mlp.up_proj", "model.norm", "lm_head", "model", "", "model.layers.0.self_attn.q_proj.lora_A",
]) | st.text(max_size=20)
# weighted towards edits that keep the container valid, so most examples reach the metadata and model checks
# (hypothesis favours the first element and small integers, so the gentlest edits come first)
OPS = ["config"] * 5 + ["retarget"] * 2 + ["targets"] * 2 + ["meta"] * 2 + ["dtype", "shape", "offsets", "drop",
                                                                          "rename", "copy", "name"]
plausible = (st.integers(-4, 70) | st.floats(-100, 100) | st.sampled_from(["float32", "bfloat16", "int8", "lora"])
             | st.lists(st.sampled_from(["q_proj$", "v_proj", "(", "reader", "inner"]), max_size=2))
CONFIG_FIELDS = ["variant", "r", "alpha", "dtype", "target_names", "exclude_names", "layers", "target_roles",
                 "lambda0", "group_size", "svd", "surprise"]


def _adapters(meta) -> dict:
    try:
        adapters = json.loads(meta.get("adapters", "{}"))
    except ValueError:
        return {}
    return adapters if isinstance(adapters, dict) else {}


def mutate(draw_, header: dict, data: bytes) -> tuple[dict, bytes]:
    meta = header["__metadata__"]
    tensors = sorted(k for k in header if k != "__metadata__")
    op = draw_(st.sampled_from(OPS))
    key = draw_(st.sampled_from(tensors)) if tensors else None
    adapters = _adapters(meta)
    entry = adapters.get("default") if isinstance(adapters.get("default"), dict) else None
    if op == "dtype" and key:
        header[key]["dtype"] = draw_(st.sampled_from(["F16", "BF16", "F64", "I8", "I64", "U8", "BOOL", "F8_E4M3"])
                                     | json_values)
    elif op == "shape" and key:
        header[key]["shape"] = draw_(st.lists(sizes, max_size=3) | json_values)
    elif op == "offsets" and key:
        header[key]["data_offsets"] = draw_(st.lists(sizes, min_size=2, max_size=2) | json_values)
    elif op == "drop" and key:
        del header[key]
    elif op in ("rename", "copy") and key:
        moved = header[key] if op == "copy" else header.pop(key)
        adapter = draw_(st.sampled_from(["default", "other", ""]))
        header[f"{draw_(layer_names)}.lora_adapters.{adapter}." + draw_(st.sampled_from(["lora_A", "lora_B", "lora_X"]))] = dict(moved)
    elif op == "meta":
        field = draw_(st.sampled_from(["format", "format_version", "adapters", "config", "extra"]))
        if draw_(st.booleans()):
            meta.pop(field, None)
        else:
            meta[field] = draw_(st.text(max_size=30) | json_values.map(json.dumps))
    elif op == "config" and entry is not None:
        config = entry.get("config")
        if isinstance(config, dict):
            config[draw_(st.sampled_from(CONFIG_FIELDS))] = draw_(plausible | json_values)
        meta["adapters"] = json.dumps(adapters)
    elif op == "targets" and entry is not None:
        targets = entry.get("targets")
        if isinstance(targets, list):
            if targets and draw_(st.booleans()):
                targets.pop(draw_(st.integers(0, len(targets) - 1)))
            else:
                targets.append(draw_(layer_names))
        meta["adapters"] = json.dumps(adapters)
    elif op == "name" and entry is not None:
        adapters[draw_(st.sampled_from(["other", "", "a.b", "x" * 65]) | st.text(max_size=8))] = adapters.pop("default")
        meta["adapters"] = json.dumps(adapters)
    elif op == "retarget" and entry is not None:  # move one layer's tensors and target entry to another name
        targets = entry.get("targets")
        if isinstance(targets, list) and targets and isinstance(targets[0], str):
            old, new = targets[0], draw_(layer_names)
            entry["targets"] = [new, *targets[1:]]
            meta["adapters"] = json.dumps(adapters)
            for k in [k for k in header if k.startswith(old + ".")]:
                header[new + k[len(old):]] = header.pop(k)
    if draw_(st.integers(0, 7)) == 5:  # sometimes the data is cut or padded as well
        data = data[:draw_(st.integers(0, len(data)))] + b"\0" * draw_(st.integers(0, 64))
    return header, data


def test_header_mutations(env):
    @fuzz_settings(240)
    @given(st.data())
    def run(data):
        header, payload = split(env[2])
        for _ in range(data.draw(st.integers(1, 2))):
            header, payload = mutate(data.draw, header, payload)
        load_and_check(env, join(header, payload), "header")
    run()
    assert RUNS["header"] >= 240


# ---- tensor values: 80 examples. Policy: any NaN/inf is refused with CheckpointError; finite values load.

def test_tensor_values(env):
    model = env[0]
    header, payload = split(env[2])
    keys = sorted(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0, 1e-45])

    @fuzz_settings(80)
    @given(st.sampled_from(keys), st.lists(st.tuples(st.integers(0, 10**6), special | st.floats(width=32)),
                                           min_size=1, max_size=4))
    def run(key, writes):
        begin, end = header[key]["data_offsets"]
        b = bytearray(payload)
        n = (end - begin) // 4
        for index, value in writes:
            struct.pack_into("<f", b, begin + 4 * (index % n), value)
        values = torch.frombuffer(b[begin:end], dtype=torch.float32)
        error = load_and_check(env, join(header, bytes(b)), "values")
        if torch.isfinite(values).all():
            assert error is None
        else:
            assert isinstance(error, ll.CheckpointError) and "NaN/inf" in str(error)
        assert ll.adapter_names(model) == []
    run()
    assert RUNS["values"] >= 80


# ---- huge declared sizes: 80 examples, with Python-side allocations traced as well

def test_huge_declarations_stay_bounded(env):
    header, payload = split(env[2])
    keys = sorted(k for k in header if k != "__metadata__")
    huge = st.integers(2**31, 2**64 - 1)

    @fuzz_settings(80)
    @given(st.sampled_from(["header_len", "shape", "offsets", "count"]), st.sampled_from(keys), huge, huge)
    def run(kind, key, a, b):
        h = json.loads(json.dumps(header))
        if kind == "header_len":
            data = _with_header_len(join(h, payload), a)
        else:
            if kind == "shape":
                h[key]["shape"] = [a, b % 2**40]
            elif kind == "offsets":
                h[key]["data_offsets"] = [h[key]["data_offsets"][0], a]
            else:  # a tiny file that declares many tensors of huge size back to back
                for i in range(64):
                    h[f"{key}.{i}"] = {"dtype": "F64", "shape": [a % 2**30, 1024], "data_offsets": [0, b]}
            data = join(h, payload)
        tracemalloc.start()
        try:
            error = load_and_check(env, data, "huge")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(error, ll.CheckpointError)
        assert peak < MEMORY_BOUND, f"Python allocations peaked at {peak / 2**20:.0f} MiB"
    run()
    assert RUNS["huge"] >= 80
