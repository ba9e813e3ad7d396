"""Adapters on mixture-of-experts weights stored as 3-D parameters (transformers 5: Qwen3-MoE, Mixtral, OLMoE,
DeepSeek-V3, Phi-MoE, GPT-OSS, ...).

transformers 5 fuses a MoE layer's experts into one module holding `gate_up_proj` (or `up_proj`) and `down_proj`
as (num_experts, d_out, d_in) parameters ((num_experts, d_in, d_out) when `is_transposed`). Such a module is
decorated with `use_experts_implementation`, which gives it the attributes transformers' own alternative
implementations (batched_mm, grouped_mm) compute every decorated class from: has_gate, has_bias, is_transposed,
_apply_gate, act_fn, has_post_expert_norm. lora-lite's experts forward is one more implementation of that
contract (the eager one: route, then per expert gate_up -> gate -> down -> routing weight), with each adapted
projection computed as x W_eᵀ (+ b_e) and then handed to the method's `forward` for expert e:
    LoRA:  h = x W_eᵀ + s·(x A_eᵀ) B_eᵀ       A: (E, r, d_in), B: (E, d_out, r)
a grouped low-rank path per expert; W + ΔW is never built. (PEFT's `target_parameters` rebuilds W + ΔW for every
expert on every forward.)

Mechanics. Each adapted parameter is stood for by an `ExpertsParameter` module in the experts module's
`lora_experts` ModuleDict (`...mlp.experts.lora_experts.gate_up_proj`), and adapters hang on it like on any
layer (`...lora_experts.gate_up_proj.lora_adapters.<name>.lora_A`), each tensor with a leading expert dim and
each expert's slice initialised as the method initialises one layer. While any adapter sits there, the experts
module's `forward` attribute is `functools.partial(experts_forward, module)` (a module-level function bound to the
module: deepcopy, pickle and torch.save keep it bound to their copy); with no adapter active it calls the
class's own forward, so the base computes exactly as before. Detach removes the attribute and the placeholders.
Expert parallelism and per_row routing are refused.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError

HOLDER = "lora_experts"
# attributes `use_experts_implementation` sets on a decorated experts module, which the forward below relies on
_CONTRACT = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "num_experts", "_apply_gate")


def is_experts_module(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in _CONTRACT) and hasattr(type(module).forward, "__wrapped__")


def expert_parameter_names(module: nn.Module) -> list[str]:
    """The adaptable 3-D parameters of an experts module, in registration order."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    return [n for n, p in module.named_parameters(recurse=False) if n in (up, "down_proj") and p.ndim == 3]


class ExpertsParameter(nn.Module):
    """Stands for one 3-D parameter of an experts module, so adapters can hang on it as on a layer.

    `owner` (the experts module) is kept out of the module tree, like Adapter.base. `weight` is the owner's
    parameter itself; `in_features` / `out_features` are one expert's."""

    def __init__(self, owner: nn.Module, param_name: str):
        super().__init__()
        W = getattr(owner, param_name)
        self.param_name, self.transposed = param_name, bool(owner.is_transposed)
        self.num_experts = int(W.shape[0])
        self.in_features, self.out_features = (W.shape[1], W.shape[2]) if self.transposed else (W.shape[2], W.shape[1])
        self.__dict__["owner"] = owner

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.owner, self.param_name)

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.owner, f"{self.param_name}_bias") if self.owner.has_bias else None

    def extra_repr(self) -> str:
        return f"{self.param_name}, {self.num_experts} experts, {self.in_features}->{self.out_features}"


def check_owner(owner: nn.Module, name: str) -> None:
    if getattr(owner, "_is_expert_parallel", False):
        raise UnsupportedLayerError(f"{name!r} is sharded with expert parallelism; lora-lite adapts experts held "
                                    "whole on each rank only")


def placeholder(owner: nn.Module, param_name: str) -> ExpertsParameter:
    """The registered ExpertsParameter for `param_name`, or a new, not yet registered one."""
    holder = owner._modules.get(HOLDER)
    if holder is not None and param_name in holder:
        return holder[param_name]
    return ExpertsParameter(owner, param_name)


def register(ph: ExpertsParameter) -> ExpertsParameter:
    """Put `ph` on its experts module, unless one for that parameter is there already; returns the one in use."""
    owner = ph.owner
    if HOLDER not in owner._modules:
        owner.add_module(HOLDER, nn.ModuleDict())
    holder = owner._modules[HOLDER]
    if ph.param_name not in holder:
        holder[ph.param_name] = ph
    return holder[ph.param_name]


def unregister_if_empty(ph: ExpertsParameter) -> None:
    owner = ph.owner
    holder = owner._modules.get(HOLDER)
    if holder is None or holder._modules.get(ph.param_name) is not ph or "lora_adapters" in ph._modules:
        return
    del holder[ph.param_name]
    if not len(holder):
        del owner._modules[HOLDER]


def sync_forward(owner: nn.Module) -> None:
    """Route the owner's calls through experts_forward exactly while some placeholder carries an adapter."""
    holder = owner._modules.get(HOLDER)
    needed = holder is not None and any("lora_adapters" in ph._modules for ph in holder.values())
    current = owner.__dict__.get("forward")
    present = isinstance(current, functools.partial) and current.func is experts_forward
    if needed and not present:
        owner.forward = functools.partial(experts_forward, owner)
    elif present and not needed:
        del owner.__dict__["forward"]


def _routing_args(owner, args, kwargs):
    """(hidden_states, top_k_index, top_k_weights), whatever the class calls them (GPT-OSS: router_indices, ...)."""
    bound = inspect.signature(type(owner).forward.__wrapped__).bind(owner, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) != 3:
        raise UnsupportedLayerError(f"{type(owner).__name__}.forward was called with {len(values)} arguments; lora-lite "
                                    "expects (hidden_states, top_k_index, top_k_weights)")
    return values


def _active(owner) -> dict[str, list]:
    holder = owner._modules[HOLDER]
    return {pname: [a for a in ph.lora_adapters.values() if a.active] if "lora_adapters" in ph._modules else []
            for pname, ph in holder.items()}


def experts_forward(owner: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The experts module's forward with its adapters (transformers' eager experts computation)."""
    active = _active(owner)
    if not any(active.values()):
        return type(owner).forward(owner, *args, **kwargs)
    hidden, top_k_index, top_k_weights = _routing_args(owner, args, kwargs)
    if any(a.rows is not None for adapters in active.values() for a in adapters):
        raise UnsupportedLayerError("per_row routing is not supported on expert parameters: the experts see tokens, "
                                    "not batch rows. Run those rows separately with set_active")
    up = "gate_up_proj" if owner.has_gate else "up_proj"
    final = torch.zeros_like(hidden)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=owner.num_experts).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        top_k_pos, token_idx = torch.where(expert_mask[e])
        h = _project(owner, up, e, hidden[token_idx], active.get(up, ()))
        h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
        out = _project(owner, "down_proj", e, h, active.get("down_proj", ()))
        if owner.has_post_expert_norm:
            out = owner.post_expert_norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _project(owner, param_name: str, e: int, x: torch.Tensor, adapters) -> torch.Tensor:
    W = getattr(owner, param_name)[e]
    y = x @ W if owner.is_transposed else F.linear(x, W)
    if owner.has_bias:
        y = y + getattr(owner, f"{param_name}_bias")[e]
    for a in adapters:
        y = a.variant.forward(ExpertSlice(a, e, y.dtype), x, y).to(y.dtype)
    return y


class ExpertSlice:
    """Adapter `a` as one expert's layer: its `lora_*` tensors sliced at expert e (cast to `dtype` when given,
    with autograd flowing back to the stored tensors), everything else as on the Adapter."""

    def __init__(self, a, e: int, dtype: torch.dtype | None = None):
        self._adapter, self._e, self._dtype, self.master = a, e, dtype, a

    def __getattr__(self, attr):
        value = getattr(self._adapter, attr)
        if attr.startswith("lora_") and isinstance(value, torch.Tensor):
            with torch.enable_grad():
                value = value[self._e]
                if self._dtype is not None and value.is_floating_point():
                    value = value.to(self._dtype)
        setattr(self, attr, value)
        return value

    @property
    def weight(self) -> torch.Tensor:
        """Expert e's matrix as (d_out, d_in)."""
        W = self._adapter.base.weight[self._e]
        return W.T if self._adapter.base.transposed else W

    def project(self, x, M):
        return F.linear(x, M)
