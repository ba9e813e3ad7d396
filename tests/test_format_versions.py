"""Files written before format v2 still load: tests/fixtures/v1 holds adapters saved by lora-lite at 22842f6
(format_version "1") with the logits the adapted model gave; they must load to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_lite as ll
from conftest import load_stories260k

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
FILES = sorted(p.stem for p in FIXTURES.glob("*.safetensors") if p.stem != "expected_logits")


def test_the_fixtures_are_v1_files():
    assert len(FILES) >= 5
    for name in FILES:
        with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert meta["format_version"] == "1" and json.loads(meta["config"])["variant"] == name


@pytest.mark.parametrize("name", FILES)
def test_v1_file_loads_to_the_outputs_it_was_saved_with(name, tmp_path):
    expected = load_file(str(FIXTURES / "expected_logits.safetensors"))
    model = load_stories260k()
    assert ll.load(model, FIXTURES / f"{name}.safetensors") == ["default"]
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.allclose(logits, expected[name], rtol=0, atol=1e-5), (logits - expected[name]).abs().max()
    # and it re-saves as v2 and loads again to the same outputs
    ll.save(model, tmp_path / "v2.safetensors")
    again = load_stories260k()
    ll.load(again, tmp_path / "v2.safetensors")
    with torch.no_grad():
        assert torch.equal(again(expected["input_ids"]).logits, logits)
