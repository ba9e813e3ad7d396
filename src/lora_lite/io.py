"""save / load: adapter files are safetensors, so loading never runs code.

Layout: one tensor per adapter tensor, keyed by its full module path (`model.layers.0.self_attn.q_proj.lora_A`),
plus string metadata:
    format       "lora-lite"     format_version  "1"
    config       the variant config as JSON (AdapterConfig.to_dict)
    targets      JSON list of the adapted module names

Data-driven and SVD inits store what they computed (as frozen `lora_*` buffers), so load() never needs
calibration data and never recomputes an SVD. The file is untrusted: lora_lite.validate checks its header,
metadata, values and fit to the model before the model is touched (see docs/errors.md for every refusal).

Every write here is atomic (temp file in the same directory, flush, fsync, rename, fsync the directory): a
crash leaves the old file or the new one, never a torn mix. The benchmark writes its results through the
same helpers. A process killed mid-write can leave a hidden `.<name>.*.tmp` next to the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import validate
from .config import AdapterConfig
from .errors import AttachStateError, CheckpointError
from .runtime import _attach, get_state, variant_of
from .validate import FORMAT, FORMAT_VERSION


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter to `path` (a .safetensors file), atomically."""
    state = get_state(model)
    if state is None:
        raise AttachStateError("save() found no adapter on this model; attach or load one first")
    path = Path(path)
    tensors = {}
    for name, layer in state.layers.items():
        for tname in layer._lora_tensor_names:
            tensors[f"{name}.{tname}"] = getattr(layer, tname).detach().to("cpu").contiguous()
    return write_adapter(path, state.cfg, list(state.layers), tensors)


def write_adapter(path: Path, cfg: AdapterConfig, targets: list[str], tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter tensors (CPU, keyed `<module>.<lora_name>`) with their config and target names, atomically."""
    if path.is_dir():
        raise CheckpointError(f"save() target {str(path)!r} is a directory; pass a file path such as "
                              f"{str(path / 'adapter.safetensors')!r}")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_json(),
                "targets": json.dumps(targets)}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except OSError as e:
        raise CheckpointError(f"could not write {str(path)!r} ({e}); any previous file there is unchanged. "
                              "Check the directory exists, is writable and has free space") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; when the block succeeds, fsync it and rename it over `path`.

    If the block (or the rename) raises, the temp file is deleted and `path` is left as it was. The new file
    keeps the mode of the file it replaces (0o644 if there was none), not mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable; Windows cannot open directories
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: a crash leaves either the old file or the new one, never a torn mix."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON with sorted keys, indent 2 and no NaN/inf (strict JSON readers reject them)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_adapter_file(path: str | os.PathLike) -> tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]:
    """Parse and validate an adapter file on its own (no model): config, target names, tensors."""
    path = validate.check_path(path)
    meta, entries = validate.read_header(path)
    cfg, targets = validate.parse_metadata(meta, path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if set(f.keys()) != set(entries):
                raise CheckpointError(f"{str(path)!r} changed while it was being read; load it again")
            # get_tensor returns views of a memory map of the file; copy them, or a later in-place overwrite of
            # the file (`cp new.safetensors adapter.safetensors`) would crash training with SIGBUS.
            tensors = {k: f.get_tensor(k).clone() for k in entries}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); it is truncated or "
                              "corrupt: re-download it or re-save it with lora_lite.save") from None
    if any((t.dtype, tuple(t.shape)) != entries[k] for k, t in tensors.items()):
        raise CheckpointError(f"{str(path)!r} changed while it was being read; load it again")
    validate.check_finite(tensors, path)
    return cfg, targets, tensors


def load(model: nn.Module, path: str | os.PathLike):
    """Attach the adapter stored at `path` to `model`, with its trained values. Returns the hook handles.

    The model must be the same base the adapter was trained on. The file's header, metadata and values, and
    every tensor's name, shape and dtype against the target layers, are checked first; on any failure a
    LoraLiteError is raised and the model is left exactly as it was.
    """
    cfg, targets, tensors = read_adapter_file(path)
    return attach_tensors(model, cfg, targets, tensors, source=str(path))


def attach_tensors(model: nn.Module, cfg: AdapterConfig, targets: list[str], tensors: dict[str, torch.Tensor],
                   source: str):
    """Attach `cfg` with the given `<module>.<lora tensor>` values after checking they fit `model` exactly."""
    path = source
    variant = variant_of(cfg)
    if get_state(model) is not None:
        raise AttachStateError("this model already carries an adapter; call lora_lite.detach(model) before load()")
    plan = validate.fit_to_model(model, variant, cfg, targets, tensors, Path(path))
    return _attach(model, cfg, calibration_data=None, state_dict=tensors, targets=plan)
