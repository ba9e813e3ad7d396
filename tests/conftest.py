"""Shared fixtures: tiny models built from configs, the real stories260K Llama, GSM8K text.

Assets under ../shared (or $LORA_LITE_SHARED) are optional on a user's clone: tests that need them skip with
the reason shown in the summary. Under CI=true a missing asset is a failure, never a skip.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from lora_lite.shared_data import SHARED_ENV, gsm8k_file, stories260k_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test models are tiny: one thread is as fast, and immune to oversubscription when other jobs share the cores.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*kernels-community.*")
# `.ci/run` from a fresh clone, 2026-12-02, 2983 tests: pytest 10 min wall on a quiet machine, 12 min with a
# 1-thread benchmark beside it, 22 min with heavier load. Update it when the suite grows a lot.
SUITE_MINUTES = "10 (quiet) to 22 (busy)"


def pytest_collection_finish(session):
    """Say up front what the run is and roughly how long it takes (also under -q, which hides pytest's header);
    pytest's percentage then shows the progress."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or session.config.option.collectonly:
        return
    shared = os.environ.get(SHARED_ENV, "../shared (default)")
    reporter.write_line(f"lora-lite: {len(session.items)} tests (every registered method through the invariant matrix, "
                        f"PEFT parity, model families, file fuzzing, Trainer/TRL, the CLIs, every docs snippet); "
                        f"offline assets from {shared}")
    reporter.write_line(f"the whole suite takes about {SUITE_MINUTES} min on a 2-core machine (1 torch thread per "
                        "test); the percentage on the right is the progress, --durations=20 lists the slowest tests")


def require_asset(path) -> None:
    """Skip (user clone) or fail (CI=true) when an offline asset is missing."""
    if path.exists():
        return
    msg = f"offline asset {path} is missing; set {SHARED_ENV} to the folder holding models/ and data/"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {msg}")
    pytest.skip(msg)


def make_tiny_qwen(dtype=torch.float32, seed=0, layers=2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, attention_bias=True,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    # Random biases, so that a wrongly scaled or dropped bias shows up in every check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def load_stories260k(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    require_asset(stories260k_dir() / "model.safetensors")
    return AutoModelForCausalLM.from_pretrained(stories260k_dir(), dtype=dtype).eval()


def stories_tokenizer():
    from transformers import AutoTokenizer

    require_asset(stories260k_dir() / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(stories260k_dir())
    tok.pad_token = tok.unk_token
    tok.padding_side = "left"
    return tok


def gsm8k_rows(split="train", n=None):
    path = gsm8k_file(split)
    require_asset(path)
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


_MODEL_CACHE: dict = {}


def fresh_model(kind: str, dtype=torch.float32):
    """A fresh deep copy of a cached base model: 'qwen' (tiny, from config) or 'stories' (pretrained)."""
    key = (kind, dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = make_tiny_qwen(dtype) if kind == "qwen" else load_stories260k(dtype)
    return copy.deepcopy(_MODEL_CACHE[key])


@pytest.fixture
def tiny_qwen():
    return fresh_model("qwen")


@pytest.fixture
def stories():
    return fresh_model("stories")
