"""attach / detach, the hooks, and which adapters are active: the whole runtime.

attach(model, cfg, name) finds the target layers and hangs one `Adapter` module on each, in the layer's
`lora_adapters` ModuleDict under the adapter's name. The Adapter holds the method's `lora_*` tensors and its
config; the layer keeps its own weights and class, so state-dict keys of the base, bitsandbytes layers and
everything else about the model stay as they were. A layer may carry several adapters.

Each adapted layer gets one forward hook (a pre-hook for input-side methods). Hooks are module-level functions
that read everything from the layer they run on, never from a closure, so `copy.deepcopy(model)` gives an
independent adapted model, `pickle`/`torch.save(model)` round-trip, and the dtype is read from the tensors at
call time (`model.to(torch.bfloat16)` after attach just works). The hook runs the layer's active adapters in
attach order, each on the output of the one before; input-side adapters act on the input before the layer runs.

Dtypes: adapter tensors are stored in fp32 by default (`cfg.dtype` sets another storage dtype) and cast to the
activation dtype inside the hook, so a bf16 model computes in bf16, keeps no fp32 copy of any activation for
backward, and AdamW's small updates are not rounded away. The base output is never rounded to another dtype.

attach is a transaction: every check runs before the model is touched, and if anything fails after that (an
init, a calibration pass, a KeyboardInterrupt) the model is rolled back to exactly what it was: same weights bit
for bit, same requires_grad and train/eval flags, no hooks, no stray attributes, parameters or buffers.

Weight rewriting (PiSSA, the SVD-basis family) goes through one path: a method exposes `base_delta(a)`; the
adapter keeps a CPU copy of the original W, the layer holds W - base_delta while the adapter is active, and the
original W is copied back bit for bit when it is switched off or detached. At most one adapter per layer may
rewrite its weight.

Layers that are not nn.Linear (GPT-2's Conv1D, convolutions, embeddings, MoE expert parameters) are seen by the
method through their kind (lora_lite.layer_kinds): `a.weight` is W as (d_out, d_in), `a.project(x, M)` applies a
(k, d_in) matrix to the input as the layer applies W, and the hook hands the method the output features-last.
Each adapter's `cfg` is its layer's config (r and alpha from rank_pattern / alpha_pattern); `attached_cfg` is
the config attach was given. Modules trained whole and trainable embedding rows live in lora_lite.extras.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from . import experts, extras
from .config import AdapterConfig, for_layer, pattern_values
from .errors import (
    AttachStateError,
    CalibrationError,
    ConfigError,
    SkippedLayersWarning,
    UnsupportedLayerError,
)
from .layer_kinds import KINDS, kind_of
from .save_guard import guard, unguard
from .target import plan_targets
from .transaction import ModelSnapshot
from .variant import (
    REGISTRY,
    as_dtype,
    autocast_off,
    couples_rows,
    hook_only_methods,
    layer_kinds,
    rewrites_weight,
    variant_named,
)

CONTAINER = "lora_adapters"
FROZEN_ATTR = "_lora_lite_frozen"  # on the module attach was called on: the base parameters it froze
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class Adapter(nn.Module):
    """One named adapter on one layer: its `lora_*` tensors, its config and method, and a link to the layer.

    `base` is the layer itself, kept out of the module tree (the layer owns the adapter, not the reverse).
    `active` switches it on and off; `rows` routes it to some batch rows only (lora_lite.per_row).
    `cfg` is this layer's config (rank_pattern / alpha_pattern applied), `attached_cfg` the one attach was given;
    `kind` names the layer's kind (lora_lite.layer_kinds), which `weight` and `project` go through.
    """

    def __init__(self, name: str, layer: nn.Module, cfg: AdapterConfig, variant: type, role: str | None, order: int,
                 attached_cfg: AdapterConfig | None = None):
        super().__init__()
        self.name, self.cfg, self.variant, self.role, self.order = name, cfg, variant, role, order
        self.attached_cfg = cfg if attached_cfg is None else attached_cfg
        self.kind = kind_of(layer)
        self.d_in, self.d_out = KINDS[self.kind].dims(layer)
        self.input_side = hasattr(variant, "forward_input")
        self.tensor_names: tuple[str, ...] = ()
        self.active = True
        self.rows: torch.Tensor | None = None
        self.routed_batch = 0
        self.original_weight: torch.Tensor | None = None  # CPU copy of W, for methods with base_delta
        self.residual_applied = False
        self.__dict__["base"] = layer

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight as a (d_out, d_in) matrix (a view where the layout allows)."""
        return KINDS[self.kind].as_2d(self.base, self.base.weight)

    def project(self, x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """x·Mᵀ for a (k, d_in) M, applied to the layer's input the way the layer applies W; (..., k)."""
        return KINDS[self.kind].project(self.base, x, M)

    def extra_repr(self) -> str:
        return f"{self.variant.name!r}, {self.kind}, {self.d_in}->{self.d_out}, active={self.active}"


class _Compute:
    """An adapter as `forward` / `forward_input` see it: its floating `lora_*` tensors cast to the activation dtype
    (once per call, on first use; autograd flows back to the stored tensors), everything else as on the Adapter.
    `master` is the Adapter itself, for per-call statistics that want the stored precision (DoRA's row norm)."""

    def __init__(self, adapter: Adapter, dtype: torch.dtype):
        self._adapter, self._dtype, self.master = adapter, dtype, adapter

    def __getattr__(self, attr):
        value = getattr(self._adapter, attr)
        if (attr.startswith("lora_") and isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype != self._dtype):  # fp32 master in an fp32 model: no cast node, no grad-mode switch
            with torch.enable_grad():  # the cast is cached: one made first under no_grad must still carry grads
                value = value.to(self._dtype)
        setattr(self, attr, value)
        return value


def _output_hook(layer, args, y):
    adapters = [a for a in layer.lora_adapters.values() if a.active and not a.input_side]
    if not adapters:
        return None
    kind = KINDS[adapters[0].kind]
    y = _features_last(layer, kind, y, adapters[0])
    x, dtype = args[0], y.dtype
    if x.is_floating_point() and x.dtype != dtype:  # autocast: the layer computed in y's dtype
        x = x.to(dtype)
    for a in adapters:
        forward = a.variant.forward
        if a.rows is None:
            y = as_dtype(forward(_Compute(a, dtype), x, y), dtype)
        else:
            rows = _routed_rows(a, y)
            y = y.index_put((rows,), as_dtype(forward(_Compute(a, dtype), x[rows], y[rows]), dtype))
    return kind.from_rows(layer, y)


def _features_last(layer, kind, y, a: Adapter) -> torch.Tensor:
    """The layer's output with its d_out features last, or a clear error for a layer that is not what it seemed."""
    if not isinstance(y, torch.Tensor):
        raise UnsupportedLayerError(f"a {type(layer).__name__} carrying adapter {a.name!r} returned a "
                                    f"{type(y).__name__}, not its output tensor, so no adapter can act on it; "
                                    "detach and leave that layer out (exclude_names)")
    y = kind.to_rows(layer, y)
    if y.shape[-1] != a.d_out:
        raise UnsupportedLayerError(f"a {type(layer).__name__} carrying adapter {a.name!r} returned shape "
                                    f"{tuple(y.shape)}, not (..., {a.d_out}): its forward is not x·Wᵀ (+ b), so no "
                                    "adapter can act on it; detach and leave that layer out (exclude_names)")
    return y


def _input_hook(layer, args):
    adapters = [a for a in layer.lora_adapters.values() if a.active and a.input_side]
    if not adapters:
        return None
    x = args[0]
    for a in adapters:
        forward_input = a.variant.forward_input
        if a.rows is None:
            x = as_dtype(forward_input(_Compute(a, x.dtype), x), x.dtype)
        else:
            rows = _routed_rows(a, x)
            x = x.index_put((rows,), as_dtype(forward_input(_Compute(a, x.dtype), x[rows]), x.dtype))
    return (x, *args[1:])


def _routed_rows(a: Adapter, t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] != a.routed_batch:
        raise AttachStateError(f"per_row was given {a.routed_batch} names but a layer saw an input of shape "
                               f"{tuple(t.shape)}; pass one name per row of the batch (batch-first inputs)")
    return a.rows.to(t.device)


def _sync_hooks(layer: nn.Module) -> None:
    """Give the layer exactly the hooks its adapters need: an output hook and/or an input hook, or none."""
    if isinstance(layer, experts.ExpertsParameter):  # the experts module runs their forward (lora_lite.experts)
        experts.unregister_if_empty(layer)
        experts.sync_forward(layer.owner)
        return
    adapters = list(layer.lora_adapters.values()) if CONTAINER in layer._modules else []
    for hooks, fn, needed in ((layer._forward_hooks, _output_hook, any(not a.input_side for a in adapters)),
                              (layer._forward_pre_hooks, _input_hook, any(a.input_side for a in adapters))):
        present = [k for k, h in hooks.items() if h is fn]
        if needed and not present:
            (layer.register_forward_hook if fn is _output_hook else layer.register_forward_pre_hook)(fn)
        elif not needed:
            for k in present:
                del hooks[k]


# ---------------------------------------------------------------------------------------------- queries


def iter_adapters(model: nn.Module) -> list[Adapter]:
    return sorted((m for m in model.modules() if isinstance(m, Adapter)), key=lambda a: a.order)


def adapters_by_name(model: nn.Module) -> dict[str, list[Adapter]]:
    """{name: [Adapter, ...]} in attach order. One name is one config: a name attached twice is an error."""
    groups: dict[str, list[Adapter]] = {}
    for a in iter_adapters(model):
        groups.setdefault(a.name, []).append(a)
    for name, group in groups.items():
        if any(a.attached_cfg != group[0].attached_cfg or a.variant is not group[0].variant for a in group):
            raise AttachStateError(f"adapter {name!r} was attached twice with different configs (e.g. once to a "
                                   "sub-module and once to the whole model); detach one of them")
    return groups


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to `model`, in attach order."""
    return list(adapters_by_name(model))


def adapter_extras(model: nn.Module, name: str | None = None) -> list:
    """The modules_to_save / token-row holders (lora_lite.extras) of adapter `name` (None: of every adapter)."""
    return [e for e in extras.iter_extras(model) if name in (None, e.name)]


def resolve_name(model: nn.Module, name: str | None, what: str) -> str:
    """`name`, checked to be attached; None means the model's only adapter."""
    names = adapter_names(model)
    if not names:
        raise AttachStateError(f"{what} found no adapter on this model; attach or load one first")
    if name is None:
        if len(names) > 1:
            raise AttachStateError(f"{what}: this model carries adapters {names}; pass name= to pick one")
        return names[0]
    if name not in names:
        raise AttachStateError(f"{what}: no adapter named {name!r} on this model; attached: {names}")
    return name


# Segments that wrappers (FSDP1, activation checkpointing, torch.compile) insert into module names: a layer keeps
# the name it has in the bare model, so files written from a wrapped model load onto the bare one.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def bare_name(name: str) -> str:
    """A module's name with the segments wrappers insert removed (the name it has in the bare model)."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def adapter_layers(model: nn.Module, name: str | None = None) -> dict[str, Adapter]:
    """{qualified layer name (relative to `model`): Adapter} for one adapter (None: the model's only one)."""
    name = resolve_name(model, name, "adapter_layers()")
    return {bare_name(lname): layer.lora_adapters[name]
            for lname, layer in model.named_modules() if CONTAINER in layer._modules and name in layer.lora_adapters}


def adapter_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    return adapters_by_name(model)[resolve_name(model, name, "adapter_config()")][0].attached_cfg


def variant_of(cfg: AdapterConfig) -> type:
    if not isinstance(cfg, AdapterConfig):
        raise ConfigError(f"cfg must be a method config such as LoRAConfig(r=8), got {type(cfg).__name__}")
    return variant_named(cfg.variant)


def has_dense_weight(layer: nn.Module) -> bool:
    """A plain float weight that init/forward may read and rewrite (not bnb's Int8Params/Params4bit): of an
    nn.Linear, or of a Conv1D, conv or embedding layer."""
    w = getattr(layer, "weight", None)
    kind = kind_of(layer)
    return (type(w) in (torch.Tensor, nn.Parameter) and w.dtype.is_floating_point and kind is not None
            and (kind != "linear" or isinstance(layer, nn.Linear)))


def storage_dtype(layer: nn.Module, cfg: AdapterConfig) -> torch.dtype:
    """cfg.dtype, else fp32 master tensors (fp64 on an fp64 layer)."""
    if cfg.dtype is not None:
        return cfg.dtype
    return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- attach


def attach(model: nn.Module, cfg: AdapterConfig, name: str = "default", calibration_data=None) -> list[Adapter]:
    """Attach the adapter described by `cfg` under `name` to every matching layer of `model`; it starts active.

    `calibration_data` is an iterable of model inputs (dicts are called as model(**batch)) for methods with a
    data-driven `group_init` (EVA, CorDA, ...). It is never stored, so checkpoints stay data-free.
    Returns the Adapter modules it added, one per layer.
    """
    variant = variant_of(cfg)
    if getattr(variant, "requires_calibration", False) and calibration_data is None:
        raise CalibrationError(f"method {cfg.variant!r} initialises from data: pass calibration_data=[batch, ...] "
                               "(model inputs, e.g. dicts with input_ids and attention_mask) to attach()")
    check_new_name(model, name)
    plan = plan_targets(model, cfg)
    if plan.skipped:
        warnings.warn(SkippedLayersWarning(f"all-linear left out what cannot take {cfg.variant!r}: "
                                           f"{plan.skipped_summary()}"), stacklevel=2)
    extra = extras.plan(model, cfg, name, [layer for _, layer, _ in plan.targets])
    return install(model, name, cfg, plan.targets, tensors=None, calibration_data=calibration_data, extra=extra)


def check_new_name(model: nn.Module, name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (it becomes a module key)")
    if name in adapter_names(model):
        raise AttachStateError(f"an adapter named {name!r} is already attached; pick another name, or "
                               f"lora_lite.detach(model, {name!r}) first")


def plan_layer(variant: type, cfg: AdapterConfig, name: str, lname: str, layer: nn.Module):
    """Every check that can fail on one layer, run before anything is modified. Returns its ParamSpecs.
    `cfg` is the layer's config (for_layer: rank_pattern / alpha_pattern applied)."""
    kind = kind_of(layer)
    supported = layer_kinds(variant)
    if kind not in supported:
        others = sorted(n for n, v in REGISTRY.items() if kind in layer_kinds(v))
        raise UnsupportedLayerError(
            f"method {cfg.variant!r} supports layer kinds {supported}, but {lname!r} is a {type(layer).__name__} "
            f"(kind {kind!r}). Leave it out (exclude_names), or use a method that supports {kind!r}: "
            f"{', '.join(others) or 'none'}")
    try:
        KINDS[kind].check(layer)
        if kind == "experts":
            experts.check_owner(layer.owner, lname)
    except UnsupportedLayerError as e:
        raise UnsupportedLayerError(f"{lname!r}: {e}") from None
    if getattr(variant, "needs_dense_weight", False) and not has_dense_weight(layer):
        raise UnsupportedLayerError(
            f"method {cfg.variant!r} reads or rewrites a dense weight, but {lname!r} is a {type(layer).__name__} "
            f"with a {type(layer.weight).__name__} weight of dtype {layer.weight.dtype}. It supports only plain "
            f"float nn.Linear layers: load the base unquantized, or use a hook-only method "
            f"({', '.join(hook_only_methods())})")
    container = layer._modules.get(CONTAINER)
    if CONTAINER in layer.__dict__ or (container is not None and not isinstance(container, nn.ModuleDict)):
        raise AttachStateError(f"{lname!r} has its own attribute {CONTAINER!r}; lora-lite cannot adapt it")
    others = list(container.values()) if container is not None else []
    if name in (container or {}):
        raise AttachStateError(f"{lname!r} already carries an adapter named {name!r}; detach it or pick another name")
    rewriting = [a.name for a in others if rewrites_weight(a.variant)]
    if rewrites_weight(variant) and rewriting:
        raise AttachStateError(f"{lname!r} already carries {rewriting[0]!r}, which rewrites its weight; a layer can "
                               f"hold only one such adapter, so {cfg.variant!r} cannot go there too. Exclude that "
                               "layer, or detach the other adapter first")
    d_in, d_out = KINDS[kind].dims(layer)
    if hasattr(variant, "check"):
        try:
            variant.check(d_in, d_out, cfg)
        except ConfigError as e:
            raise ConfigError(f"layer {lname!r}: {e}") from None
    specs = variant.param_specs(d_in, d_out, cfg)
    for tname in specs:
        if not tname.startswith("lora_") or not tname.isidentifier():
            raise ConfigError(f"method {cfg.variant!r} names a tensor {tname!r}; adapter tensors are identifiers "
                              "starting with lora_")
    return specs


def install(model, name, cfg, targets, *, tensors, calibration_data, layer_values=None,
            extra: extras.ExtrasPlan | None = None) -> list[Adapter]:
    """attach() and load() share this. load() passes checked tensors (`<layer>.<lora tensor>` keys, plus the
    extras' keys), the targets it resolved by name and each layer's stored r / alpha (`layer_values`, so no
    pattern regex runs); then neither init nor group_init runs. attach() passes layer_values=None: they come from
    the config's rank_pattern / alpha_pattern."""
    variant = variant_of(cfg)
    seen: dict[int, str] = {}
    plans = []
    for lname, layer, role in targets:
        if id(layer) in seen:
            raise AttachStateError(f"{lname!r} and {seen[id(layer)]!r} are one module under two names; target it once")
        seen[id(layer)] = lname
        values = pattern_values(cfg, lname) if layer_values is None else layer_values.get(lname, {})
        layer_cfg = for_layer(cfg, values)
        plans.append((lname, layer, role, layer_cfg, plan_layer(variant, layer_cfg, name, lname, layer)))

    if rewrites_weight(variant):
        _refuse_tied(model, cfg, plans)
    snapshot = ModelSnapshot(model)
    existing = iter_adapters(model)
    order = 1 + max((a.order for a in existing + extras.iter_extras(model)), default=-1)
    in_adapters = {id(p) for a in existing for p in a.parameters()}
    in_adapters |= {id(p) for e in extras.iter_extras(model) for p in extras.trained_parameters(e)}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in in_adapters]
    added: list[Adapter] = []
    added_extras: list = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for lname, layer, role, layer_cfg, specs in plans:
            if isinstance(layer, experts.ExpertsParameter):  # the placeholder another adapter registered, if any
                layer = experts.register(layer)
            a = Adapter(name, layer, layer_cfg, variant, role, order, attached_cfg=cfg)
            if CONTAINER not in layer._modules:
                layer.add_module(CONTAINER, nn.ModuleDict())
            layer.lora_adapters[name] = a
            added.append(a)  # registered first, so a failure below is rolled back
            _add_tensors(a, lname, specs, tensors)
        if hasattr(variant, "group_setup"):  # on attach and on load: what layers share, or what the config rebuilds
            variant.group_setup(model, added, cfg, loaded=tensors is not None)
        if tensors is None and hasattr(variant, "init"):
            for a in added:
                variant.init(a)
        for a in added:
            if rewrites_weight(variant):
                a.original_weight = a.base.weight.detach().to("cpu", copy=True)
                apply_residual(a)
            _sync_hooks(a.base)
        if tensors is None and hasattr(variant, "group_init"):
            # Hooks are live here, so each layer's calibration inputs are what training will see downstream.
            variant.group_init(model, added, cfg, calibration_data)
            for a in added:
                if rewrites_weight(variant):
                    apply_residual(a)
        if extra is not None:
            added_extras += extras.install(extra, name, order, lambda m: storage_dtype(m, cfg), tensors)
    except BaseException:
        try:
            extras.remove(added_extras)
            remove_adapters(added)
        finally:
            snapshot.restore()
            for p in frozen:
                p.requires_grad_(True)
        raise
    if frozen:
        model.__dict__.setdefault(FROZEN_ATTR, []).extend(frozen)
    guard(model)  # transformers' save_pretrained would drop the adapter silently: refuse it (save_guard.py)
    return added


def _refuse_tied(model: nn.Module, cfg: AdapterConfig, plans) -> None:
    """A weight another module holds too (a tied output head) cannot be rewritten without changing that module."""
    targets = {id(plan[1].weight): plan[0] for plan in plans}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            if id(p) in targets and n != targets[id(p)]:
                raise AttachStateError(f"method {cfg.variant!r} rewrites the weight of {targets[id(p)]!r}, which {n!r} "
                                       "holds too (tied weights), so it would change as well; untie the weights or "
                                       "leave that layer out")


def stored_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a ParamSpec tensor is stored with on `layer`: one per expert on expert parameters."""
    return (layer.num_experts, *shape) if isinstance(layer, experts.ExpertsParameter) else tuple(shape)


def _add_tensors(a: Adapter, lname: str, specs, tensors) -> None:
    layer = a.base
    device, dtype = layer.weight.device, storage_dtype(layer, a.cfg)
    for tname, spec in specs.items():
        if tensors is not None:
            # always a fresh copy: safetensors hands back buffers that are not 64-byte aligned, and on CPU
            # an unaligned operand sends matmuls down another kernel path, so reloaded outputs drift by an ulp
            t = tensors[f"{lname}.{tname}"].to(device, copy=True)
        elif isinstance(layer, experts.ExpertsParameter):  # each expert initialised as one layer would be
            t = torch.stack([spec.make_tensor(dtype, device) for _ in range(layer.num_experts)])
        else:
            t = spec.make_tensor(dtype, device)
        if spec.as_buffer:
            a.register_buffer(tname, t, persistent=True)
        else:
            a.register_parameter(tname, nn.Parameter(t, requires_grad=spec.trainable))
    a.tensor_names = tuple(specs)


@torch.no_grad()
def residual(a: Adapter) -> torch.Tensor:
    """W_original - base_delta in the layer's own layout: computed in fp32 in the kind's (d_out, d_in) view and
    rounded once to W's dtype."""
    layer, kind = a.base, KINDS[a.kind]
    weight = layer.weight
    with autocast_off(weight.device):  # else a switch inside an autocast block would rebuild W_res from bf16 math
        delta = a.variant.base_delta(a).to(weight.device, torch.float32)
    original = kind.as_2d(layer, a.original_weight.to(weight.device, torch.float32))
    return kind.from_2d(layer, original - delta).to(weight.dtype)


@torch.no_grad()
def apply_residual(a: Adapter) -> None:
    a.base.weight.copy_(residual(a))
    a.residual_applied = True


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's original weight: the copy a weight-rewriting adapter keeps, else the weight it holds."""
    container = layer._modules.get(CONTAINER)
    kept = [a.original_weight for a in (container.values() if container is not None else ())
            if a.original_weight is not None]
    return kept[0] if kept else layer.weight


def base_matrix(layer: nn.Module) -> torch.Tensor:
    """base_weight as the (d_out, d_in) matrix its kind shows a method (layer_kinds); for expert parameters the
    experts' matrices stacked, (num_experts·d_out, d_in)."""
    kind, W = KINDS[kind_of(layer)], base_weight(layer)
    if isinstance(layer, experts.ExpertsParameter):
        return torch.cat([kind.as_2d(layer, W[e]) for e in range(layer.num_experts)])
    return kind.as_2d(layer, W)


@torch.no_grad()
def restore_weight(a: Adapter) -> None:
    a.base.weight.copy_(a.original_weight)
    a.residual_applied = False


# ---------------------------------------------------------------------------------------------- activity


def set_activity(a: Adapter, on: bool) -> None:
    a.active = on
    if a.original_weight is not None and on != a.residual_applied:
        (apply_residual if on else restore_weight)(a)


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly `names` active; the other adapters stay attached and pass their input through."""
    wanted = [names] if isinstance(names, str) else list(names)
    groups = adapters_by_name(model)
    unknown = sorted(set(wanted) - set(groups))
    if unknown:
        raise AttachStateError(f"set_active: no adapter named {unknown}; attached: {list(groups)}")
    for a in iter_adapters(model):
        set_activity(a, a.name in wanted)
    for e in extras.iter_extras(model):
        extras.set_activity(e, e.name in wanted)


def active_names(model: nn.Module) -> list[str]:
    return [name for name, group in adapters_by_name(model).items() if group[0].active]


@contextmanager
def disabled(model: nn.Module):
    """`with lora_lite.disabled(model):` the exact base model inside (weights a method rewrote are restored), the
    adapters as they were after, also on an exception. Nestable."""
    adapters = iter_adapters(model)
    if not adapters:
        raise AttachStateError("disabled() found no adapter on this model; attach or load one first")
    before = [(a, a.active) for a in adapters]
    before_extras = [(e, e.active) for e in extras.iter_extras(model)]
    try:
        for a in adapters:
            set_activity(a, False)
        for e, _ in before_extras:
            extras.set_activity(e, False)
        yield model
    finally:
        for a, was_active in before:
            if _still_attached(a):
                set_activity(a, was_active)
        for e, was_active in before_extras:
            if e in extras.iter_extras(model):
                extras.set_activity(e, was_active)


@contextmanager
def per_row(model: nn.Module, names: Iterable[str | None]):
    """`with lora_lite.per_row(model, ["a", None, "b"]):` row i of every batch goes through adapter names[i]
    alone (None: the base), as if each row ran by itself with only that adapter active."""
    names = list(names)
    groups = adapters_by_name(model)
    unknown = sorted({n for n in names if n is not None} - set(groups))
    if unknown or not names:
        raise AttachStateError(f"per_row needs one adapter name (or None) per batch row; unknown {unknown}, "
                               f"attached: {list(groups)}")
    mixed = sorted({n for n in names if n is not None and rewrites_weight(groups[n][0].variant)})
    if mixed:
        raise AttachStateError(f"per_row cannot route rows to {mixed}: a weight-rewriting method changes W for the "
                               "whole batch. Run those rows separately with set_active, or merge that adapter")
    whole = sorted({e.name for e in extras.iter_extras(model)} | {n for n, g in groups.items() if any(
        a.kind == "experts" for a in g)})
    if whole:
        raise AttachStateError(f"per_row cannot route rows to or around {whole}: modules trained whole, trained "
                               "embedding rows and expert parameters act on the whole batch (or on tokens, not "
                               "rows). Run those rows separately with set_active")
    coupled = sorted({n for n in names if n is not None and couples_rows(groups[n][0].attached_cfg)})
    if coupled:
        raise AttachStateError(f"per_row cannot route rows to {coupled}: with this config a row's output depends on "
                               "the other rows of the batch, so no row can run as if alone. Run those rows "
                               "separately with set_active, or pick the method's per-token option (see its docstring)")
    adapters = iter_adapters(model)
    before = [(a, a.active, a.rows, a.routed_batch) for a in adapters]
    try:
        for a in adapters:
            rows = [i for i, n in enumerate(names) if n == a.name]
            set_activity(a, bool(rows))
            a.rows, a.routed_batch = (torch.tensor(rows), len(names)) if rows else (None, 0)
        yield model
    finally:
        for a, was_active, rows, routed in before:
            a.rows, a.routed_batch = rows, routed
            if _still_attached(a):
                set_activity(a, was_active)


def _still_attached(a: Adapter) -> bool:
    container = a.base._modules.get(CONTAINER)
    return container is not None and container._modules.get(a.name) is a


# ---------------------------------------------------------------------------------------------- detach


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (None: all): hooks, tensors and attributes go, and every weight is bit-identical to
    before it was attached. Once no adapter is left, requires_grad flags are as they were before the first attach.
    A model with no adapter is left alone."""
    groups = adapters_by_name(model)
    if name is not None and name not in groups:
        raise AttachStateError(f"detach(): no adapter named {name!r} on this model; attached: {list(groups)}")
    extras.remove([e for e in extras.iter_extras(model) if name in (None, e.name)])
    remove_adapters([a for n, group in groups.items() if name in (None, n) for a in group])
    if not iter_adapters(model):
        for module in model.modules():
            for p in module.__dict__.pop(FROZEN_ATTR, ()):
                p.requires_grad_(True)
    unguard(model)


@torch.no_grad()
def remove_adapters(adapters: list[Adapter]) -> None:
    for a in reversed(adapters):
        if a.residual_applied:
            restore_weight(a)
        layer = a.base
        container = layer._modules.get(CONTAINER)
        if container is not None and container._modules.get(a.name) is a:
            del container[a.name]
            if not len(container):
                del layer._modules[CONTAINER]
        _sync_hooks(layer)
