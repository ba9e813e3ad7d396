"""save / load: adapter files are safetensors, so loading never runs code.

Layout: one tensor per adapter tensor, keyed by its full module path (`model.layers.0.self_attn.q_proj.lora_A`),
plus string metadata:
    format       "lora-lite"     format_version  "1"
    config       the variant config as JSON (AdapterConfig.to_dict)
    targets      JSON list of the adapted module names

Data-driven and SVD inits store what they computed (as frozen `lora_*` buffers), so load() never needs
calibration data and never recomputes an SVD. Everything in the file is checked against the model before
the model is touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import AdapterConfig
from .errors import AttachStateError, CheckpointError, LoraLiteError
from .runtime import _attach, _plan_layer, get_state, variant_of
from .target import find_targets

FORMAT = "lora-lite"
FORMAT_VERSION = "1"


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter to `path` (a .safetensors file), atomically."""
    state = get_state(model)
    if state is None:
        raise AttachStateError("save() found no adapter on this model; attach or load one first")
    tensors = {}
    for name, layer in state.layers.items():
        for tname in layer._lora_tensor_names:
            tensors[f"{name}.{tname}"] = getattr(layer, tname).detach().to("cpu").contiguous()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": state.cfg.to_json(),
                "targets": json.dumps(list(state.layers))}
    path = Path(path)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync it, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter_file(path: str | os.PathLike) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse and validate an adapter file on its own (no model): config, target names, tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {str(path)!r} does not exist; pass the path save() wrote")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            _check_metadata(meta, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, LoraLiteError):
            raise
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors adapter file ({e}); it is truncated, "
                              "corrupt or not written by lora_lite.save") from None
    try:
        cfg = AdapterConfig.from_dict(json.loads(meta["config"]))
        targets = json.loads(meta["targets"])
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r} has malformed config/targets metadata ({e}); re-save the adapter") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{str(path)!r}: metadata 'targets' must be a list of module names")
    return cfg, targets, tensors


def _check_metadata(meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a lora-lite adapter (metadata format={meta.get('format')!r}, "
                              f"expected {FORMAT!r}); for PEFT directories use lora_lite.import_peft")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format_version {meta.get('format_version')!r}; this lora-lite "
                              f"reads version {FORMAT_VERSION}. Upgrade lora-lite or re-save the adapter")
    for key in ("config", "targets"):
        if key not in meta:
            raise CheckpointError(f"{str(path)!r} lacks the {key!r} metadata entry; re-save it with lora_lite.save")


def load(model: nn.Module, path: str | os.PathLike):
    """Attach the adapter stored at `path` to `model`, with its trained values. Returns the hook handles.

    The model must be the same base the adapter was trained on. Every tensor name, shape and dtype and the
    set of target layers are checked first; on any mismatch the model is left untouched.
    """
    cfg, targets, tensors = read_adapter_file(path)
    variant = variant_of(cfg)
    if get_state(model) is not None:
        raise AttachStateError("this model already carries an adapter; call lora_lite.detach(model) before load()")
    matched = {name: layer for name, layer, _ in find_targets(model, cfg)}
    if sorted(matched) != sorted(targets):
        missing, extra = sorted(set(targets) - set(matched)), sorted(set(matched) - set(targets))
        raise CheckpointError(f"{str(path)!r} was saved for other layers: in the file but not matched on this model "
                              f"{missing[:5]}, matched here but not in the file {extra[:5]}. Load it onto the "
                              "architecture it was trained on")
    expected = {}
    for name, layer in matched.items():
        for tname, spec in _plan_layer(variant, cfg, name, layer).items():
            expected[f"{name}.{tname}"] = spec.shape
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not match variant {cfg.variant!r}: missing lora keys {missing[:5]}, "
                              f"unexpected lora keys {unexpected[:5]}. The file is damaged or from another version")
    dtypes = {t.dtype for t in tensors.values()}
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{key} has shape {tuple(t.shape)} in {str(path)!r} but this model needs {tuple(shape)}; "
                                  "the adapter was trained on a different base model")
        if not t.dtype.is_floating_point or len(dtypes) != 1:
            raise CheckpointError(f"{key} has dtype {t.dtype}; adapter tensors must share one float dtype "
                                  f"(found {sorted(map(str, dtypes))})")
    return _attach(model, cfg, calibration_data=None, state_dict=tensors)
