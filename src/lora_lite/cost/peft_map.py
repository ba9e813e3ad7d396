"""The PEFT adapter that matches a lora-lite config: same target modules (by full name), same r and knobs.

Each method states its PEFT equivalent in its own registration (`peft(cfg, target_names)`, and `peft_prepare`
where PEFT needs a step beyond its config); this module is the one place that reads them. The parity tests (tests/test_peft_parity.py) check that these pairs compute the
same outputs and gradients; the cost report builds them side by side with ours.
"""

from __future__ import annotations

from ..config import AdapterConfig
from ..variant import variant_named


def peft_config(cfg: AdapterConfig, target_names: list[str]):
    """(PeftConfig, label), or None where PEFT has no equivalent."""
    equivalent = getattr(variant_named(cfg.variant), "peft", None)
    return None if equivalent is None else equivalent(cfg, list(target_names))


def build_peft_model(model, cfg: AdapterConfig, target_names: list[str]):
    """Wrap `model` (consumed) in PEFT's equivalent of `cfg`; None where there is none."""
    import peft

    mapped = peft_config(cfg, target_names)
    if mapped is None:
        return None, "no PEFT equivalent"
    pcfg, label = mapped
    peft_model = peft.get_peft_model(model, pcfg)
    prepare = getattr(variant_named(cfg.variant), "peft_prepare", None)
    if prepare is not None:
        prepare(peft_model, cfg)
    return peft_model, label
