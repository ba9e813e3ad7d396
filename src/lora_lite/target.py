"""Which layers get an adapter.

A layer qualifies when lora-lite knows its kind (lora_lite.layer_kinds): linear-like modules qualify
structurally (`in_features`, `out_features`, `weight`), which admits nn.Linear and the bitsandbytes
Linear4bit/Linear8bitLt without a list of classes; transformers' Conv1D, nn.Conv1d/2d/3d and nn.Embedding by
class; and the 3-D expert parameters of transformers-5 MoE layers (lora_lite.experts) by name.

Filters, in order: exclude regexes, layer indices, include regexes (or all-linear), roles. Roles are only
computed when a role filter is set, so an unusual model never fails on a layer you did not ask for.

all-linear means every linear or Conv1D layer, plus the expert parameters when the method supports that kind,
except the output head (get_output_embeddings()) and embeddings; named explicitly, the head can be adapted. It never builds an adapter that would not run or would crash: it leaves
out, and `plan_targets` reports (attach warns with the list),
  - the `out_proj` of an nn.MultiheadAttention, which reads out_proj.weight and never calls out_proj;
  - linear subclasses whose forward returns several values (the routers of Phi-MoE and Llama 4);
  - a model's task head (`score`, `classifier`), which a fresh fine-tune trains whole (modules_to_save);
  - layers of a kind the method does not support.
Naming such a layer explicitly is refused with the same reason, and so is naming an nn.MultiheadAttention.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass, field

from torch import nn

from . import experts
from .config import AdapterConfig
from .errors import TargetError
from .layer_kinds import LINEAR_KINDS, hf_conv1d_class, is_linear_like, kind_of

_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")
_WRITER_NAMES = ("o_proj", "out_proj", "down_proj", "dense_4h_to_h", "fc2", "c_proj")
_READER_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "up_proj", "gate_proj", "fc1", "c_attn")
TASK_HEADS = ("score", "classifier")  # PEFT's names for sequence-classification heads
# lora-lite's own modules, never targets
INTERNAL = ("lora_adapters", "lora_experts", "lora_saved", "lora_tokens")


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def d_model(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    return max((m.in_features for m in model.modules() if is_linear_like(m)), default=0)


def role_of(name: str, module: nn.Module, hidden: int) -> str:
    d_in, d_out = module.in_features, module.out_features
    if d_in == hidden and d_out != hidden:
        return "reader"
    if d_out == hidden and d_in != hidden:
        return "writer"
    if d_in == hidden and d_out == hidden:
        leaf = name.rsplit(".", 1)[-1]
        if any(k in leaf for k in _WRITER_NAMES):
            return "writer"
        if any(k in leaf for k in _READER_NAMES):
            return "reader"
        raise TargetError(f"cannot tell whether square layer {name!r} ({d_in}->{d_out}) reads from or writes to "
                          "the residual stream; drop target_roles and select it with target_names instead")
    return "inner"


@dataclass
class TargetPlan:
    targets: list[tuple[str, nn.Module, str | None]]
    skipped: dict[str, str] = field(default_factory=dict)  # all-linear: layer name -> why it was left out

    def skipped_summary(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        return "; ".join(f"{len(names)} layer(s) {names[:3]}{' ...' if len(names) > 3 else ''}: {reason}"
                         for reason, names in by_reason.items())


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module, str | None]]:
    """Return [(qualified name, module, role or None)] for every layer the config selects."""
    return plan_targets(model, cfg).targets


def plan_targets(model: nn.Module, cfg: AdapterConfig) -> TargetPlan:
    """The layers `cfg` selects, and (all-linear) those it left out with the reason. Touches nothing."""
    from .variant import layer_kinds, variant_named  # the registry imports the variants, which import this

    kinds = layer_kinds(variant_named(cfg.variant))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hidden = d_model(model) if cfg.target_roles else 0
    unreachable = _unreachable(model, cfg)
    saved = saved_module_names(model, cfg)
    plan = TargetPlan([])
    for name, module in model.named_modules():
        if not name or (module is head and cfg.all_linear) or any(seg in name.split(".") for seg in INTERNAL):
            continue
        if isinstance(module, nn.MultiheadAttention) and _named(cfg, name):
            raise TargetError(f"{name!r} is an nn.MultiheadAttention, which computes with its in_proj_weight and "
                              "out_proj.weight directly, so no hook sees its projections: lora-lite cannot adapt it. "
                              "Adapt the layers around it, or build the model with separate q/k/v/out nn.Linear "
                              "projections")
        if experts.is_experts_module(module):
            for pname in experts.expert_parameter_names(module):
                _consider_expert(plan, cfg, kinds, name, module, pname, saved, hidden)
            continue
        kind = kind_of(module)
        if kind is None or _filtered_out(cfg, name):
            continue
        whole = _inside(name, saved)
        if whole is not None:
            if _named(cfg, name):
                raise TargetError(f"{name!r} is inside {whole!r}, which modules_to_save trains whole; target one "
                                  "or the other")
            continue
        if cfg.all_linear:
            if kind not in LINEAR_KINDS:
                continue
        elif not _named(cfg, name):
            continue
        reason = unreachable.get(id(module))
        if reason is None and cfg.all_linear and kind not in kinds:
            reason = f"method {cfg.variant!r} supports layer kinds {kinds}, these are {kind}"
        if reason is not None:
            if not cfg.all_linear:
                raise TargetError(f"{name!r} cannot take an adapter: {reason}. Leave it out of target_names")
            plan.skipped[name] = reason
            continue
        role = role_of(name, module, hidden) if cfg.target_roles else None
        if cfg.target_roles and role not in cfg.target_roles:
            continue
        plan.targets.append((name, module, role))
    if not plan.targets:
        raise TargetError(_nothing_matched(model, cfg, plan))
    return plan


def _named(cfg: AdapterConfig, name: str) -> bool:
    return not cfg.all_linear and any(re.search(p, name) for p in cfg.target_names)


def _filtered_out(cfg: AdapterConfig, name: str) -> bool:
    if any(re.search(p, name) for p in cfg.exclude_names):
        return True
    return cfg.layers is not None and layer_index(name) not in cfg.layers


def _consider_expert(plan, cfg, kinds, owner_name, owner, pname, saved, hidden) -> None:
    full = f"{owner_name}.{pname}"
    if _filtered_out(cfg, full) or _inside(full, saved):
        return
    if not (cfg.all_linear or any(re.search(p, full) for p in cfg.target_parameters)):
        return
    if "experts" not in kinds and cfg.all_linear:
        plan.skipped[full] = f"method {cfg.variant!r} supports layer kinds {kinds}, these are experts"
        return
    name, ph = f"{owner_name}.{experts.HOLDER}.{pname}", experts.placeholder(owner, pname)
    role = role_of(name, ph, hidden) if cfg.target_roles else None
    if not cfg.target_roles or role in cfg.target_roles:
        plan.targets.append((name, ph, role))


def _inside(name: str, saved: list[str]) -> str | None:
    return next((s for s in saved if name == s or name.startswith(s + ".")), None)


def _unreachable(model: nn.Module, cfg: AdapterConfig) -> dict[int, str]:
    """{id(module): why an adapter on it would never run or would crash}."""
    out = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Module):
            out[id(module.out_proj)] = ("nn.MultiheadAttention reads out_proj.weight and never calls out_proj, so an "
                                        "adapter there would never run")
        elif kind_of(module) == "linear" and returns_several_values(module):
            out[id(module)] = (f"{type(module).__name__}.forward returns several values (a router), not the "
                               "layer's output")
    if cfg.all_linear:
        for attr in TASK_HEADS:
            head = getattr(model, attr, None)
            for m in head.modules() if isinstance(head, nn.Module) else ():
                if kind_of(m) in LINEAR_KINDS:
                    out.setdefault(id(m), f"the task head {attr!r}: train it whole with modules_to_save=({attr!r},)")
    return out


_KNOWN_FORWARDS = (nn.Linear.forward,)


def returns_several_values(module: nn.Module) -> bool:
    """Whether a linear-like module's forward returns a tuple: by its return annotation, else by a `return a, b`
    in its source. (Routers that subclass nn.Linear, e.g. Phi-MoE's and Llama 4's, do.)"""
    forward = type(module).forward
    conv1d = hf_conv1d_class()
    if forward in _KNOWN_FORWARDS or (conv1d is not None and forward is conv1d.forward):
        return False
    annotation = inspect.signature(forward).return_annotation
    if annotation is not inspect.Signature.empty:
        text = annotation if isinstance(annotation, str) else str(annotation)
        return typing.get_origin(annotation) is tuple or text.startswith(("tuple", "Tuple", "typing.Tuple"))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False  # no source: the output hook still refuses a non-tensor output at the first call
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(tree))


def saved_module_names(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Modules modules_to_save selects (the top-most match of each branch); each regex must match one."""
    if not cfg.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and not any(s in n.split(".") for s in INTERNAL)]
    for pattern in cfg.modules_to_save:
        if not any(re.search(pattern, n) for n in names):
            raise TargetError(f"modules_to_save entry {pattern!r} matches no module; modules include "
                              f"{names[-8:]} (e.g. 'classifier', 'score', 'lm_head')")
    matched = [n for n in names if any(re.search(p, n) for p in cfg.modules_to_save)]
    return [n for n in matched if not any(n.startswith(m + ".") for m in matched)]


def _nothing_matched(model: nn.Module, cfg: AdapterConfig, plan: TargetPlan) -> str:
    adaptable = [n for n, m in model.named_modules() if n and kind_of(m) is not None]
    skipped = f" all-linear left out: {plan.skipped_summary()}." if plan.skipped else ""
    return (f"no target layers matched: target_names={cfg.target_names}, exclude_names={cfg.exclude_names}, "
            f"layers={cfg.layers}, target_roles={cfg.target_roles}, target_parameters={cfg.target_parameters}."
            f"{skipped} The model's adaptable layers include {adaptable[:8]}{' ...' if len(adaptable) > 8 else ''}; "
            "adjust the regexes or filters to match some of them")
