"""Config fields are type- and range-checked on construction, so a config typed by hand and one rebuilt from a
file obey the same rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import lora_lite as ll
from lora_lite.config import AdapterConfig


@pytest.mark.parametrize("fields,match", [
    (dict(r="8"), "LoRAConfig.r must be int, got '8' \\(str\\)"),
    (dict(r=True), "LoRAConfig.r must be int, got True \\(bool\\)"),
    (dict(r=8.0), "LoRAConfig.r must be int"),
    (dict(r=0), "r must be a positive int"),
    (dict(r=2**31), "below 2\\*\\*31"),
    (dict(r=10**5000), "int too large to print"),
    (dict(alpha=math.nan), "alpha must be float .*floats finite"),
    (dict(alpha=-math.inf), "alpha must be float"),
    (dict(alpha=10**400), "alpha must be float"),
    (dict(alpha="16"), "alpha must be float"),
    (dict(dtype=torch.int8), "dtype must be None or one of"),
    (dict(dtype="int8"), "dtype 'int8' is not one of"),
    (dict(dtype=torch.int8), "dtype must be None or one of"),
    (dict(target_names=[r"q_proj", 3]), "target_names must be"),
    (dict(target_names=r"q_proj["), "not a valid regular expression"),
    (dict(layers=(0, True)), "layers must be"),
    (dict(layers=[-1]), "negative index"),
    (dict(layers={0, 1}), "layers must be"),
    (dict(target_roles=("reader", "head")), "allowed roles"),
])
def test_bad_fields_are_refused(fields, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoRAConfig(**fields)


def test_conversions():
    cfg = ll.LoRAConfig(r=4, alpha=8, target_names="q_proj$", layers=range(2), target_roles=["reader"])
    assert (cfg.alpha, type(cfg.alpha)) == (8.0, float)
    assert cfg.target_names == ("q_proj$",) and cfg.layers == (0, 1) and cfg.target_roles == ("reader",)
    assert ll.LoRAConfig(dtype="bfloat16").dtype == torch.bfloat16
    for method in ll.REGISTRY.values():
        c = method.config()
        assert AdapterConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("d,error,match", [
    ([("variant", "lora")], ll.ConfigError, "must be a dict"),
    ("lora", ll.ConfigError, "must be a dict"),
    ({"r": 4}, ll.ConfigError, "no 'variant' string"),
    ({"variant": ["lora"]}, ll.ConfigError, "no 'variant' string"),
    ({"variant": "lorax"}, ll.UnknownVariantError, "not registered"),
    ({"variant": "lora", 7: 1}, ll.ConfigError, "unknown fields \\['7'\\]"),
    ({"variant": "lora", "dtype": {"x": 1}}, ll.ConfigError, "is not one of"),
])
def test_from_dict_refuses_malformed_input(d, error, match):
    with pytest.raises(error, match=match):
        AdapterConfig.from_dict(d)


@pytest.fixture
def rich():
    @dataclass
    class RichConfig(AdapterConfig):
        mode: Literal["a", "b"] = "a"
        weights: dict[str, float] | None = None
        pair: tuple[int, float] = (1, 2.0)
        names: list[str] = field(default_factory=list)

    class Rich:
        name, config, paper, params_per_layer = "test_rich", RichConfig, ("-", "-"), "-"
        param_specs = staticmethod(lambda d_in, d_out, cfg: {})
        forward = staticmethod(lambda a, x, y: y)

    ll.register(Rich)
    yield RichConfig
    ll.REGISTRY.pop("test_rich")


def test_variant_config_annotations(rich):
    cfg = rich(mode="b", weights={"x": 1}, pair=[3, 4], names=("a",))
    assert (cfg.weights, cfg.pair, cfg.names) == ({"x": 1.0}, (3, 4.0), ["a"])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(mode="c"), dict(mode=1), dict(weights={"x": "1"}), dict(pair=(1,)), dict(pair=(1.5, 2.0)),
                dict(names="abc")):
        with pytest.raises(ll.ConfigError, match="RichConfig"):
            rich(**bad)
