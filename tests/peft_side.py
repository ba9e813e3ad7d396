"""PEFT's side of the architecture tests: what PEFT adapts, and a PEFT model holding our adapter's exact values.

The value copy is written here from PEFT's own layer code (lora.Linear / Conv / Embedding, ParamWrapper's
get_delta_weight), independently of lora_lite.peft_layout, so the parity test checks one mapping and the export
round trip checks the other.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.runtime import adapter_extras, adapter_layers

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer, ParamWrapper  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402

PREFIX = "base_model.model."


def bare(name: str) -> str:
    """A PEFT module name as the base model names it."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name.removeprefix(PREFIX))


def peft_adapted(peft_model: nn.Module) -> set[str]:
    """Layers (and `<module>.<parameter>` for target_parameters) PEFT put a LoRA on."""
    out = set()
    for n, m in peft_model.named_modules():
        if isinstance(m, ParamWrapper):
            out.add(f"{bare(n)}.{m.parameter_name}")
        elif isinstance(m, LoraLayer) and (len(m.lora_A) or len(m.lora_embedding_A)):
            out.add(bare(n))
    return out


def ours_adapted(model: nn.Module, name: str | None = None) -> set[str]:
    """Our adapted layers, expert placeholders named as PEFT names the parameter."""
    return {n.replace(".lora_experts.", ".") for n in adapter_layers(model, name)}


def all_linear(base: nn.Module, task_type: str | None, r: int = 4) -> set[str]:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules="all-linear",
                                                                     task_type=task_type))
    return peft_adapted(model)


def peft_like(base: nn.Module, ours: nn.Module, task_type: str | None) -> nn.Module:
    """A PEFT model of `base` adapting exactly the layers `ours` adapts, with the same r, alpha and values."""
    layers = adapter_layers(ours)
    cfg = ll.runtime.adapter_config(ours)
    modules = [n for n, a in layers.items() if a.kind != "experts"]
    params = [n.replace(".lora_experts.", ".") for n, a in layers.items() if a.kind == "experts"]
    saved = sorted({next(n for n, m in ours.named_modules() if m is e.base) for e in adapter_extras(ours)
                    if isinstance(e, ll.extras.SavedModule)})
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=modules or None,
                             target_parameters=params or None, modules_to_save=saved or None, task_type=task_type,
                             fan_in_fan_out=any(a.kind == "conv1d_gpt2" for a in layers.values()))
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    copy_values(ours, theirs)
    return theirs.eval()


@torch.no_grad()
def copy_values(ours: nn.Module, theirs: nn.Module) -> None:
    named = dict(theirs.named_modules())
    wrappers = {(bare(n), m.parameter_name): m for n, m in named.items() if isinstance(m, ParamWrapper)}
    lora = {bare(n): m for n, m in named.items() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}
    for lname, a in adapter_layers(ours).items():
        A, B = a.lora_A.detach(), a.lora_B.detach()
        if a.kind == "experts":  # lora_A (E·r, in) expert-major; lora_B (out, r·E) with column k·E + e
            owner, pname = lname.split(".lora_experts.")
            w = wrappers[(owner, pname)]
            E, r, d_in = A.shape
            w.lora_A["default"].weight.copy_(A.reshape(E * r, d_in))
            w.lora_B["default"].weight.copy_(torch.einsum("eor->ore", B).reshape(B.shape[1], r * E))
        elif a.kind == "embedding":
            lora[lname].lora_embedding_A["default"].copy_(A)
            lora[lname].lora_embedding_B["default"].copy_(B)
        else:
            layer = lora[lname]
            wA, wB = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            wA.copy_(A.reshape(wA.shape))  # convs: (r, C_in, *kernel) and (C_out, r, 1, ...)
            wB.copy_(B.reshape(wB.shape))
    for e in adapter_extras(ours):
        if isinstance(e, ll.extras.SavedModule):
            mname = next(n for n, m in ours.named_modules() if m is e.base)
            wrapper = next(m for n, m in named.items() if isinstance(m, ModulesToSaveWrapper) and bare(n) == mname)
            copy_module = wrapper.modules_to_save["default"]
            for pname, value in ll.extras.own_parameters(e.base).items():
                copy_module.get_parameter(pname).copy_(value)
