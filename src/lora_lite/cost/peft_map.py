"""The PEFT adapter that matches a lora-lite config: same target modules (by full name), same r and knobs.

`peft_config(cfg, target_names)` returns (PeftConfig, label) or None where PEFT has no equivalent. The
parity tests (tests/test_peft_parity.py) check that these pairs compute the same outputs and gradients.
"""

from __future__ import annotations

from ..config import AdapterConfig


def peft_config(cfg: AdapterConfig, target_names: list[str]):
    import peft

    v, targets = cfg.variant, list(target_names)
    if v in ("lora", "dora", "pissa"):
        init, label = True, "LoraConfig"
        if v == "dora":
            label = "LoraConfig(use_dora=True)"
        if v == "pissa":
            init = "pissa" if cfg.svd == "full" else f"pissa_niter_{cfg.niter}"
            label = f'LoraConfig(init_lora_weights="{init}")'
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets,
                               use_dora=v == "dora", init_lora_weights=init), label
    if v == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[]), "IA3Config"
    if v == "ia3_ff":
        return (peft.IA3Config(target_modules=targets, feedforward_modules=targets),
                "IA3Config(feedforward_modules=targets)")
    if v == "hra":
        return peft.HRAConfig(r=cfg.r, target_modules=targets), "HRAConfig"
    if v == "delora":
        return peft.DeloraConfig(r=cfg.r, delora_lambda=cfg.lambda0, target_modules=targets), "DeloraConfig"
    if v == "road":
        return (peft.RoadConfig(variant=cfg.road_variant, group_size=cfg.group_size, target_modules=targets),
                f'RoadConfig(variant="{cfg.road_variant}")')
    return None


def build_peft_model(model, cfg: AdapterConfig, target_names: list[str]):
    """Wrap `model` (consumed) in PEFT's equivalent of `cfg`; None where there is none."""
    import peft

    mapped = peft_config(cfg, target_names)
    if mapped is None:
        return None, "no PEFT equivalent"
    pcfg, label = mapped
    return peft.get_peft_model(model, pcfg), label
