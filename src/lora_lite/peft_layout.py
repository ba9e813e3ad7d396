"""Where each lora-lite tensor goes in a PEFT LoRA checkpoint, per layer kind (for export_peft / import_peft).

Keys are under `base_model.model.`; `<layer>` is the module's path in the bare model.
    kind          PEFT keys                                   layout against ours (A: (r, d_in), B: (d_out, r))
    linear        <layer>.lora_A.weight, <layer>.lora_B.weight   the same
    conv1d_gpt2   the same (PEFT's fan_in_fan_out only changes how it merges W)
    conv          the same                                    A as (r, C_in, *kernel), B as (C_out, r, 1, ...)
    embedding     <layer>.lora_embedding_A, .lora_embedding_B  the same
    experts       <experts module>[.base_layer]*.lora_A.weight  (E·r, d_in): expert e's A in rows e·r .. e·r+r-1
                  <experts module>[.base_layer]*.lora_B.weight  (d_out, r·E): B[:, k·E + e] is column k of B_e
                  PEFT wraps one targeted parameter per ParamWrapper, in registration order, so the first
                  parameter sits deepest: its keys carry one `.base_layer` per targeted parameter after it.
modules_to_save   <module>.<parameter>                        values
token rows        <embedding>.token_adapter.trainable_tokens_delta   (n_ids, dim) values of the rows
"""

from __future__ import annotations

import torch
from torch import nn

from . import experts
from .errors import ConversionError

PREFIX = "base_model.model."
TOKENS_KEY = "token_adapter.trainable_tokens_delta"
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


def experts_prefix(owner_name: str, owner: nn.Module, targeted: set[str], param_name: str) -> str:
    """`<owner>` plus one `.base_layer` per targeted parameter registered after `param_name`."""
    order = [n for n in experts.expert_parameter_names(owner) if n in targeted]
    return owner_name + ".base_layer" * (len(order) - 1 - order.index(param_name))


def check_exportable(lname: str, layer: nn.Module, kind: str) -> None:
    """Refuse layers PEFT's LoRA layer would compute differently (its conv lora_A drops dilation, padding_mode)."""
    if kind == "conv" and (any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros"):
        raise ConversionError(f"{lname!r} is a {type(layer).__name__} with dilation={layer.dilation}, "
                              f"padding_mode={layer.padding_mode!r}; PEFT's conv LoRA applies lora_A without them, so "
                              "it would not reproduce this adapter. Use lora_lite.save, or leave that layer out")


def to_peft(key: str, kind: str, layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT tensors of one layer's factors; `key` is the module key (experts: with its `.base_layer`s).
    Experts: A (E, k, d_in), B (E, d_out, k)."""
    if kind == "embedding":
        return {f"{PREFIX}{key}.lora_embedding_A": A, f"{PREFIX}{key}.lora_embedding_B": B}
    if kind == "conv":
        ones = (1,) * (layer.weight.ndim - 2)
        A, B = A.reshape(A.shape[0], *layer.weight.shape[1:]), B.reshape(*B.shape, *ones)
    elif kind == "experts":
        E, k, d_in = A.shape
        A, B = A.reshape(E * k, d_in), B.permute(1, 2, 0).reshape(B.shape[1], k * E)
    return {f"{PREFIX}{key}.lora_A.weight": A, f"{PREFIX}{key}.lora_B.weight": B}


def from_peft(kind: str, layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of to_peft: our (A, B) (experts: with a leading expert dim)."""
    if kind == "experts":
        E = layer.num_experts
        if A.ndim != 2 or A.shape[0] % E or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ConversionError(f"expert LoRA factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do not split into "
                                  f"{E} experts")
        k = A.shape[0] // E
        return A.reshape(E, k, A.shape[1]), B.reshape(B.shape[0], k, E).permute(2, 0, 1)
    if kind == "conv":
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    return A, B


def peft_targeted(targets: list[str], param_key: str) -> bool:
    """PEFT's match of a target_parameters entry (exact key or a dotted suffix)."""
    return any(param_key == t or param_key.endswith(f".{t}") for t in targets)
