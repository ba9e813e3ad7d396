"""attach / detach: the whole runtime.

attach(model, cfg) finds the target layers, hangs the variant's `lora_*` tensors on each of them, and adds
one forward hook per layer (a pre-hook for input-side variants). No module is replaced, so state-dict keys,
bitsandbytes layers and everything else about the model stay as they were.

attach is a transaction: every check runs before the model is touched, and if anything fails after that
(an init, a calibration pass, a KeyboardInterrupt) the model is rolled back to exactly what it was: same
weights bit for bit, same requires_grad and train/eval flags, no hooks, no stray attributes, parameters or
buffers (lora_lite.transaction catches what a variant added on its own).

Weight rewriting (PiSSA, the SVD family) goes through one path: a variant exposes `base_delta(layer)`, the
runtime keeps a CPU copy of W, writes W - base_delta into the layer, and copies W back on detach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import AdapterConfig
from .errors import (
    AttachStateError,
    CalibrationError,
    ConfigError,
    UnknownVariantError,
    UnsupportedLayerError,
)
from .target import find_targets
from .transaction import ModelSnapshot
from .variant import REGISTRY

STATE_ATTR = "_lora_lite"
_LAYER_ATTRS = ("_lora_cfg", "_lora_variant", "_lora_name", "_lora_dtype", "_lora_tensor_names",
                "_lora_base_weight", "_lora_role")


@dataclass
class AttachState:
    cfg: AdapterConfig
    variant: type
    layers: dict[str, nn.Module] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)
    trainable_before: list[nn.Parameter] = field(default_factory=list)
    disabled: bool = False  # set by lora_lite.disabled(model); every hook then passes its input through


def get_state(model: nn.Module) -> AttachState | None:
    return getattr(model, STATE_ATTR, None)


def variant_of(cfg: AdapterConfig) -> type:
    if not isinstance(cfg, AdapterConfig):
        raise ConfigError(f"cfg must be a variant config such as LoRAConfig(r=8), got {type(cfg).__name__}")
    if cfg.variant not in REGISTRY:
        raise UnknownVariantError(f"unknown variant {cfg.variant!r}; registered variants: {sorted(REGISTRY)}. "
                                  "Import the module that registers it (its @lora_lite.register class)")
    return REGISTRY[cfg.variant]


def has_dense_weight(layer: nn.Module) -> bool:
    """A plain float nn.Linear weight that init/forward may read and rewrite (not bnb's Int8Params/Params4bit)."""
    w = getattr(layer, "weight", None)
    return (isinstance(layer, nn.Linear) and type(w) in (torch.Tensor, nn.Parameter)
            and w.dtype.is_floating_point)


def adapter_dtype(layer: nn.Module, cfg: AdapterConfig) -> torch.dtype:
    if cfg.dtype is not None:
        return cfg.dtype
    w = layer.weight
    return w.dtype if w.dtype.is_floating_point else torch.float32


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None) -> list[RemovableHandle]:
    """Attach the adapter described by `cfg` to every matching layer of `model`; returns the hook handles.

    `calibration_data` is an iterable of model inputs (dicts are called as model(**batch)) for variants with a
    data-driven `group_init` (EVA, CorDA, ...). It is never stored in the config, so checkpoints stay data-free.
    """
    return _attach(model, cfg, calibration_data=calibration_data, state_dict=None)


def _attach(model, cfg, *, calibration_data, state_dict, targets=None):
    """attach() and load() share this. load() passes the checked tensors and the targets it resolved by name."""
    variant = variant_of(cfg)
    if get_state(model) is not None:
        raise AttachStateError("this model already carries an adapter; call lora_lite.detach(model) first "
                               "(one adapter per model)")
    if state_dict is None and getattr(variant, "requires_calibration", False) and calibration_data is None:
        raise CalibrationError(f"variant {cfg.variant!r} initialises from data: pass calibration_data=[batch, ...] "
                               "(model inputs, e.g. dicts with input_ids and attention_mask) to attach()")
    targets = find_targets(model, cfg) if targets is None else targets
    plans = [(name, layer, role, _plan_layer(variant, cfg, name, layer)) for name, layer, role in targets]

    snapshot = ModelSnapshot(model)
    state = AttachState(cfg=cfg, variant=variant)
    state.trainable_before = [p for p in model.parameters() if p.requires_grad]
    try:
        setattr(model, STATE_ATTR, state)
        model.requires_grad_(False)
        for name, layer, role, specs in plans:
            state.layers[name] = layer  # registered first, so a failure inside _add_tensors is rolled back
            _add_tensors(layer, variant, cfg, name, role, specs, state_dict)
        if state_dict is None:
            for layer in state.layers.values():
                variant.init(layer, cfg)
        for layer in state.layers.values():
            _apply_residual(layer)
            state.handles.append(_register_hook(layer, variant, state))
        if state_dict is None and hasattr(variant, "group_init"):
            # Hooks are live here, so each layer's calibration inputs are what training will see downstream.
            variant.group_init(model, [(n, state.layers[n]) for n, *_ in plans], cfg, calibration_data)
            for layer in state.layers.values():
                _apply_residual(layer)
    except BaseException:
        try:
            _rollback(model, state)
        finally:
            snapshot.restore()
        raise
    return list(state.handles)


def _plan_layer(variant, cfg, name, layer):
    """Every check that can fail on shapes or layer types, run before anything is modified."""
    if getattr(variant, "needs_dense_weight", False) and not has_dense_weight(layer):
        raise UnsupportedLayerError(
            f"variant {cfg.variant!r} reads and rewrites a dense weight, but {name!r} is a "
            f"{type(layer).__name__} with a {type(layer.weight).__name__} weight of dtype {layer.weight.dtype}. "
            "It supports only plain float nn.Linear layers: load the base unquantized, or use a hook-only "
            "variant (lora, delora, ia3, ia3_ff, hra, road, eva)")
    d_in, d_out = int(layer.in_features), int(layer.out_features)
    if hasattr(variant, "check"):
        variant.check(d_in, d_out, cfg)
    specs = variant.param_specs(d_in, d_out, cfg)
    for tname in specs:
        if not tname.startswith("lora_"):
            raise ConfigError(f"variant {cfg.variant!r} names a tensor {tname!r}; adapter tensors must start with lora_")
        if hasattr(layer, tname):
            raise AttachStateError(f"{name!r} already has an attribute {tname!r}; detach the old adapter first")
    return specs


def _add_tensors(layer, variant, cfg, name, role, specs, state_dict):
    device = layer.weight.device
    dtype = adapter_dtype(layer, cfg)
    layer._lora_cfg, layer._lora_variant, layer._lora_name, layer._lora_role = cfg, variant, name, role
    layer._lora_tensor_names = list(specs)
    for tname, spec in specs.items():
        if state_dict is not None:
            # always a fresh copy: safetensors hands back buffers that are not 64-byte aligned, and on CPU
            # an unaligned operand sends matmuls down another kernel path, so reloaded outputs drift by an ulp
            t = state_dict[f"{name}.{tname}"].to(device, copy=True)
            dtype = t.dtype
        else:
            t = spec.make_tensor(dtype, device)
        if spec.as_buffer:
            layer.register_buffer(tname, t, persistent=True)
        else:
            layer.register_parameter(tname, nn.Parameter(t, requires_grad=spec.trainable))
    layer._lora_dtype = dtype
    if hasattr(variant, "base_delta"):
        layer._lora_base_weight = layer.weight.detach().to("cpu", copy=True)


@torch.no_grad()
def _apply_residual(layer):
    """W <- W_original - base_delta, computed in fp32 and rounded once to W's dtype."""
    if not hasattr(layer._lora_variant, "base_delta"):
        return
    original = layer._lora_base_weight.to(layer.weight.device, torch.float32)
    delta = layer._lora_variant.base_delta(layer).to(torch.float32)
    layer.weight.copy_((original - delta).to(layer.weight.dtype))


def _register_hook(layer, variant, state):
    if hasattr(variant, "forward_input"):
        def pre_hook(mod, args):
            if state.disabled:
                return None
            x = args[0]
            return (variant.forward_input(mod, x.to(mod._lora_dtype)).to(x.dtype), *args[1:])
        return layer.register_forward_pre_hook(pre_hook)

    def post_hook(mod, args, y):
        if state.disabled:
            return None
        return variant.forward(mod, args[0].to(mod._lora_dtype), y).to(y.dtype)
    return layer.register_forward_hook(post_hook)


def detach(model: nn.Module) -> None:
    """Remove the adapter: hooks, tensors and attributes go, and every weight is bit-identical to before attach.

    A model with no adapter is left alone.
    """
    if get_state(model) is not None:
        _rollback(model)


@torch.no_grad()
def _rollback(model, state=None):
    state = get_state(model) if state is None else state
    for h in state.handles:
        h.remove()
    for layer in state.layers.values():
        if hasattr(layer, "_lora_base_weight"):
            layer.weight.copy_(layer._lora_base_weight)
        for tname in getattr(layer, "_lora_tensor_names", ()):
            if tname in layer._parameters:
                del layer._parameters[tname]
            elif tname in layer._buffers:
                del layer._buffers[tname]
        for attr in _LAYER_ATTRS:
            if attr in layer.__dict__:
                delattr(layer, attr)
    for p in state.trainable_before:
        p.requires_grad_(True)
    if STATE_ATTR in model.__dict__:
        delattr(model, STATE_ATTR)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    state = get_state(model)
    if state is None:
        raise AttachStateError("no adapter is attached to this model; call lora_lite.attach(model, cfg) first")
    return dict(state.layers)
