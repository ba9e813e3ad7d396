"""save / load: adapter files are safetensors, so loading never runs code.

Format v2 (what save writes): one tensor per adapter tensor, keyed by its path in the model's state dict,
`<layer>.lora_adapters.<adapter name>.<lora tensor>` (e.g. `model.layers.0.self_attn.q_proj.lora_adapters.
default.lora_A`), plus string metadata:
    format       "lora-lite"     format_version  "2"
    adapters     JSON object {adapter name: {"config": AdapterConfig.to_dict(), "targets": [layer names]}}
A file holds one adapter or several. Format v1 (lora-lite before core v2: one adapter, keys
`<layer>.<lora tensor>`, metadata `config` and `targets`) still loads, as an adapter named "default".

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
from .runtime import (
    CONTAINER,
    FROZEN_ATTR,
    adapter_layers,
    adapters_by_name,
    check_new_name,
    install,
    remove_adapters,
    variant_of,
)
from .transaction import ModelSnapshot
from .validate import FORMAT, FORMAT_VERSION

# What one adapter in a file is: its config, its target layer names and its tensors keyed `<layer>.<lora tensor>`.
Entry = tuple[AdapterConfig, list[str], dict[str, torch.Tensor]]


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write the model's adapters (None: every one, each under its name; else just `name`) to `path`, atomically.

    Refuses (and leaves any file at `path` as it was) when a tensor holds NaN or inf.
    """
    groups = adapters_by_name(model)
    if not groups:
        raise AttachStateError("save() found no adapter on this model; attach or load one first")
    if name is not None and name not in groups:
        raise AttachStateError(f"save(): no adapter named {name!r} on this model; attached: {list(groups)}")
    entries = {}
    for n in [name] if name is not None else groups:
        layers = adapter_layers(model, n)
        # copy=True: a tensor several layers share (Lily) is written once per layer, never as aliased storage
        tensors = {f"{lname}.{t}": getattr(a, t).detach().to("cpu", copy=True).contiguous()
                   for lname, a in layers.items() for t in a.tensor_names}
        entries[n] = (groups[n][0].cfg, list(layers), tensors)
    return write_adapter(Path(path), entries)


def write_adapter(path: Path, entries: dict[str, Entry]) -> Path:
    """Write {adapter name: (config, targets, tensors)} as one format-v2 file, atomically."""
    if path.is_dir():
        raise CheckpointError(f"save() target {str(path)!r} is a directory; pass a file path such as "
                              f"{str(path / 'adapter.safetensors')!r}")
    flat = {}
    for n, (_, _, tensors) in entries.items():
        validate.check_finite(tensors, path, writing=True)
        for key, t in tensors.items():
            lname, tname = key.rsplit(".", 1)
            flat[f"{lname}.{CONTAINER}.{n}.{tname}"] = t
    adapters = {n: {"config": cfg.to_dict(), "targets": targets} for n, (cfg, targets, _) in entries.items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "adapters": json.dumps(adapters, sort_keys=True, allow_nan=False)}
    try:
        with atomic_path(path) as tmp:
            save_file(flat, tmp, metadata=metadata)
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


def read_adapter_file(path: str | os.PathLike) -> dict[str, Entry]:
    """Parse and validate an adapter file on its own (no model): {adapter name: (config, targets, tensors)}."""
    path = validate.check_path(path)
    meta, entries = validate.read_header(path)
    adapters = validate.parse_metadata(meta, path)
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
    per_adapter = validate.split_tensors(meta["format_version"], adapters, tensors, path)
    return {n: (cfg, targets, per_adapter[n]) for n, (cfg, targets) in adapters.items()}


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Attach the adapters stored at `path` to `model`, with their trained values; returns their names.

    name=None loads every adapter in the file under its stored name. A name the file holds loads just that one;
    any other name loads the file's only adapter under that name. The model must be the base the adapters were
    trained on. The file's header, metadata and values, and every tensor's name, shape and dtype against the
    target layers, are checked first; on any failure a LoraLiteError is raised and the model is left exactly as
    it was.
    """
    entries = read_adapter_file(path)
    if name is not None:
        if name in entries:
            entries = {name: entries[name]}
        elif len(entries) == 1:
            entries = {name: next(iter(entries.values()))}
        else:
            raise CheckpointError(f"{str(path)!r} holds adapters {sorted(entries)}, none named {name!r}; pass one of "
                                  "those names, or name=None to load them all")
    return attach_entries(model, entries, source=str(path))


def attach_entries(model: nn.Module, entries: dict[str, Entry], source: str) -> list[str]:
    """Attach each (config, targets, tensors) under its name after checking that all of them fit `model`."""
    plans = {}
    for n, (cfg, targets, tensors) in entries.items():
        check_new_name(model, n)
        plans[n] = validate.fit_to_model(model, variant_of(cfg), cfg, n, targets, tensors, Path(source))
    snapshot = ModelSnapshot(model)
    frozen_before = len(model.__dict__.get(FROZEN_ATTR, ()))
    installed = []
    try:
        for n, (cfg, _, tensors) in entries.items():
            installed += install(model, n, cfg, plans[n], tensors=tensors, calibration_data=None)
    except BaseException:
        try:
            remove_adapters(installed)
        finally:
            del model.__dict__.get(FROZEN_ATTR, [])[frozen_before:]
            snapshot.restore()
        raise
    return list(entries)
