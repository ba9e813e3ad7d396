"""save / load: adapter files are safetensors, so loading never runs code.

Format v2 (what save writes): one tensor per adapter tensor, keyed by its path in the model's state dict,
`<layer>.lora_adapters.<adapter name>.<lora tensor>` (e.g. `model.layers.0.self_attn.q_proj.lora_adapters.
default.lora_A`), plus string metadata:
    format       "lora-lite"     format_version  "2"
    adapters     JSON object {adapter name: {"config": AdapterConfig.to_dict(), "targets": [layer names]}}, and,
                 only when used: "layers" ({layer: {"r": .., "alpha": ..}}, the values rank_pattern /
                 alpha_pattern gave it), "modules_to_save" ([module names]), "token_rows" ({"embedding":
                 name, "tied_head": name or null}) and "base_fingerprint" ({layer name: [rms, z_1, z_2, z_3, z_4]})
Modules trained whole store each parameter under `<module>.lora_saved.<adapter>.<parameter>`, trainable embedding
rows under `<embedding>.lora_tokens.<adapter>.rows` (lora_lite.extras).
"base_fingerprint" is written for methods whose data derive from the base weights (needs_dense_weight: PiSSA,
the SVD-basis family, LoRA-XS, DoRA) and is optional when reading (files written before it load unchecked):
lora_lite.fingerprint defines it, and load refuses a base whose weights do not match it. A file holds one
adapter or several. Format v1 (lora-lite before core v2: one adapter, keys
`<layer>.<lora tensor>`, metadata `config` and `targets`) still loads, as an adapter named "default".

Data-driven and SVD inits store what they computed (as frozen `lora_*` buffers), so load() never needs
calibration data and never recomputes an SVD. The file is untrusted: lora_lite.validate checks its header,
metadata, values and fit to the model before the model is touched (see docs/errors.md for every refusal).

Every write here is atomic (temp file in the same directory, flush, fsync, rename, fsync the directory): a
crash leaves the old file or the new one, never a torn mix. The benchmark writes its results through the
same helpers. A process killed mid-write can leave a hidden `.<name>.*.tmp` next to the target (the name
shortened when a long one would not fit the filesystem's limit). Only regular files are replaced.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from . import extras, fingerprint, validate
from .checked_file import CheckedFile
from .config import LAYER_FIELDS, AdapterConfig
from .errors import AttachStateError, CheckpointError, UnsavedParametersWarning
from .runtime import (
    CONTAINER,
    FROZEN_ATTR,
    Adapter,
    adapter_layers,
    adapters_by_name,
    base_matrix,
    check_new_name,
    install,
    iter_adapters,
    remove_adapters,
    variant_of,
)
from .transaction import ModelSnapshot
from .validate import FORMAT, FORMAT_VERSION

# What one adapter in a file is: its config, its target layer names, its tensors keyed `<layer>.<lora tensor>`
# (extras keyed `<module>.lora_saved.<parameter>` / `<embedding>.lora_tokens.rows`), and `info`: the optional
# metadata ("layers", "modules_to_save", "token_rows"; {} for a plain adapter).
Entry = tuple[AdapterConfig, list[str], dict[str, torch.Tensor], dict]
_EXTRA_CONTAINERS = (extras.SAVED, extras.TOKENS)


def layer_values(a) -> dict:
    """The r / alpha a layer's adapter got from rank_pattern / alpha_pattern, where they differ from the config's."""
    return {k: getattr(a.cfg, k) for k in LAYER_FIELDS
            if hasattr(a.cfg, k) and getattr(a.cfg, k) != getattr(a.attached_cfg, k)}


def entry_info(model: nn.Module, name: str, layers: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, extras tensors) of adapter `name`, as an Entry carries them."""
    info, tensors = extras.entry(model, name)
    values = {lname: v for lname, a in layers.items() if (v := layer_values(a))}
    if values:
        info["layers"] = values
    return info, tensors


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write the model's adapters (None: every one, each under its name; else just `name`) to `path`, atomically.

    Refuses (and leaves any file at `path` as it was) when a tensor holds NaN or inf. Methods whose data derive
    from the base weights (needs_dense_weight) also store each layer's base fingerprint.
    """
    path = target_path(path, "save()")
    groups = adapters_by_name(model)
    if not groups:
        raise AttachStateError("save() found no adapter on this model; attach or load one first")
    if name is not None and name not in groups:
        raise AttachStateError(f"save(): no adapter named {name!r} on this model; attached: {list(groups)}")
    _warn_unsaved(model)
    entries = {}
    for n in [name] if name is not None else groups:
        layers = adapter_layers(model, n)
        # copy=True: a tensor several layers share (Lily) is written once per layer, never as aliased storage
        tensors = {f"{lname}.{t}": getattr(a, t).detach().to("cpu", copy=True).contiguous()
                   for lname, a in layers.items() for t in a.tensor_names}
        info, extra_tensors = entry_info(model, n, layers)
        if getattr(groups[n][0].variant, "needs_dense_weight", False):
            info["base_fingerprint"] = base_fingerprints(layers, path)
        entries[n] = (groups[n][0].attached_cfg, list(layers), tensors | extra_tensors, info)
    return write_adapter(path, entries)


def _warn_unsaved(model: nn.Module) -> None:
    """Trainable parameters no adapter owns (a head unfrozen by hand) are not saved: say so, do not drop them silently."""
    owned = {id(p) for a in iter_adapters(model) for p in a.parameters()}
    owned |= {id(p) for e in extras.iter_extras(model) for p in extras.trained_parameters(e)}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if stray:
        warnings.warn(UnsavedParametersWarning(
            f"save() does not store {len(stray)} trainable parameters that belong to no adapter ({stray[:4]}"
            f"{' ...' if len(stray) > 4 else ''}), so a reload will not have their trained values; train such "
            "modules with the config's modules_to_save=(...) instead"), stacklevel=3)


def base_fingerprints(layers: dict[str, Adapter], path: Path) -> dict[str, list[float]]:
    out = {}
    for lname, a in layers.items():
        out[lname] = fingerprint.of_weight(base_matrix(a.base))
        if not all(map(math.isfinite, out[lname])):
            raise CheckpointError(f"save() refuses to write {str(path)!r} (any file there is unchanged): the base "
                                  f"weight of {lname!r} holds NaN/inf, so the adapter's fingerprint of it is "
                                  "undefined. The base model itself is damaged; reload it")
    return out


def write_adapter(path: str | os.PathLike, entries: dict[str, Entry]) -> Path:
    """Write {adapter name: (config, targets, tensors, info)} as one format-v2 file, atomically."""
    path = target_path(path, "save()")
    flat = {}
    for n, (_, _, tensors, _) in entries.items():
        validate.check_values(tensors, path, writing=True)
        for key, t in tensors.items():
            flat[file_key(key, n)] = t
    adapters = {n: {"config": cfg.to_dict(), "targets": targets, **info} for n, (cfg, targets, _, info) in entries.items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "adapters": json.dumps(adapters, sort_keys=True, allow_nan=False)}
    try:
        with atomic_path(path) as tmp:
            save_file(flat, tmp, metadata=metadata)
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write (a full disk) as SafetensorError
        raise CheckpointError(f"could not write {str(path)!r} ({e}); any previous file there is unchanged. "
                              "Check the directory exists, is writable and has free space") from None
    return path


def file_key(key: str, name: str) -> str:
    """`<layer>.<tensor>` -> `<layer>.lora_adapters.<name>.<tensor>`; extras get the name after their container."""
    for container in _EXTRA_CONTAINERS:
        head, sep, rest = key.rpartition(f".{container}.")
        if sep:
            return f"{head}.{container}.{name}.{rest}"
    lname, tname = key.rsplit(".", 1)
    return f"{lname}.{CONTAINER}.{name}.{tname}"


def target_path(path, what: str) -> Path:
    """`path` as a Path that a write may replace: a str or PathLike that is not a directory, FIFO, socket or device,
    with a name the filesystem can hold."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"{what} needs a file path (str or os.PathLike), got {type(path).__name__}; pass e.g. "
                              "'adapter.safetensors'")
    path = Path(path)
    limit = _name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise CheckpointError(f"{what} target name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes; this "
                              f"filesystem allows {limit}. Pick a shorter file name")
    if path.is_dir():
        raise CheckpointError(f"{what} target {str(path)!r} is a directory; pass a file path such as "
                              f"{str(path / 'adapter.safetensors')!r}")
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{what} target {str(path)!r} exists and is not a regular file (a FIFO, socket or "
                              "device); lora-lite replaces only regular files. Pass another path")
    return path


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the filesystem holding `folder` allows (255 where it cannot be asked)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return 255


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; when the block succeeds, fsync it and rename it over `path`.

    If the block (or the rename) raises, the temp file is deleted and `path` is left as it was. The new file
    keeps the mode of the file it replaces (0o644 if there was none), not mkstemp's 0o600.
    """
    path = target_path(path, "write")
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp adds 8 random characters and the suffix: shorten a long name so the temp name fits NAME_MAX too
    stem, room = path.name, _name_max(path.parent) - len(".") - len(".") - 8 - len(".tmp")
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=".tmp")
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
    """Parse and validate an adapter file on its own (no model): {adapter name: (config, targets, tensors, info)}."""
    with CheckedFile(path) as f:
        adapters = validate.parse_metadata(f.meta, f.path)
        keys = validate.split_keys(f.meta["format_version"], adapters, f.entries, f.path)
        out = {}
        for n, (cfg, targets, info) in adapters.items():
            tensors = _read(f, keys[n])
            validate.check_values(tensors, f.path)
            out[n] = (cfg, targets, tensors, info)
    return out


def _read(f: CheckedFile, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """{`<layer>.<lora tensor>` (or an extra's key): tensor} for one adapter, from {that key: the file's key}."""
    raw = f.read(keys.values())
    return {k: raw[file_key] for k, file_key in keys.items()}


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Attach the adapters stored at `path` to `model`, with their trained values; returns their names.

    name=None loads every adapter in the file under its stored name. A name the file holds loads just that one;
    any other name loads the file's only adapter under that name. The model must be the base the adapters were
    trained on. The file is opened once and everything is read from that descriptor. Its header and metadata,
    every tensor's name, shape and dtype against the target layers, and the base fingerprints are checked before
    any tensor data is read; then the values (finite, within the layers' dtype, a finite residual). On any failure
    a LoraLiteError is raised and the model is left exactly as it was.
    """
    with CheckedFile(path) as f:
        adapters = validate.parse_metadata(f.meta, f.path)
        keys = validate.split_keys(f.meta["format_version"], adapters, f.entries, f.path)
        chosen = _choose(adapters, name, f.path)  # {name to load under: name in the file}
        plans = {}
        for n, stored in chosen.items():
            cfg, targets, info = adapters[stored]
            specs = {k: f.entries[file_key] for k, file_key in keys[stored].items()}
            plans[n] = plan_entry(model, n, cfg, targets, specs, info, f.path)
            validate.check_fingerprints(variant_of(cfg), n, plans[n][0], info.get("base_fingerprint"), f.path)
        entries = {n: (*adapters[s][:2], _read(f, keys[s]), adapters[s][2]) for n, s in chosen.items()}
    install_entries(model, entries, plans, f.path)
    return list(entries)


def _choose(adapters: dict, name: str | None, path: Path) -> dict[str, str]:
    if name is None:
        return {n: n for n in adapters}
    if name in adapters:
        return {name: name}
    if len(adapters) == 1:
        return {name: next(iter(adapters))}
    raise CheckpointError(f"{str(path)!r} holds adapters {sorted(adapters)}, none named {name!r}; pass one of "
                          "those names, or name=None to load them all")


def plan_entry(model: nn.Module, name: str, cfg: AdapterConfig, targets: list[str],
               specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], info: dict, source: Path):
    """Every check of one adapter against `model` that needs no tensor data; returns its install plan
    (layers, extras)."""
    check_new_name(model, name)
    main = {k: v for k, v in specs.items() if not _is_extra(k)}
    plan = validate.fit_to_model(model, variant_of(cfg), cfg, name, targets, main, source,
                                 layer_values=info.get("layers", {}))
    extra = extras.plan_from_file(model, cfg, name, info, {k: v for k, v in specs.items() if _is_extra(k)},
                                  [layer for _, layer, _ in plan], source)
    return plan, extra


def attach_entries(model: nn.Module, entries: dict[str, Entry], source: str) -> list[str]:
    """Attach each (config, targets, tensors, info) under its name after checking that all of them fit `model`."""
    plans = {n: plan_entry(model, n, cfg, targets, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                           info, Path(source))
             for n, (cfg, targets, tensors, info) in entries.items()}
    install_entries(model, entries, plans, Path(source))
    return list(entries)


def install_entries(model: nn.Module, entries: dict[str, Entry], plans: dict, source: Path) -> None:
    """Check the values against the planned layers, then install every adapter as one transaction."""
    for n, (cfg, _, tensors, _) in entries.items():
        plan = plans[n][0]
        main = {k: t for k, t in tensors.items() if not _is_extra(k)}
        validate.check_values(main, source, layer_dtypes=validate.compute_dtypes(plan))
        validate.check_values({k: t for k, t in tensors.items() if _is_extra(k)}, source)
        validate.check_residuals(variant_of(cfg), cfg, n, plan, main, source)
    snapshot = ModelSnapshot(model)
    frozen_before = len(model.__dict__.get(FROZEN_ATTR, ()))
    installed = []
    try:
        for n, (cfg, _, tensors, info) in entries.items():
            plan, extra = plans[n]
            installed += install(model, n, cfg, plan, tensors=tensors, calibration_data=None,
                                 layer_values=info.get("layers", {}), extra=extra)
    except BaseException:
        try:
            extras.remove([e for e in extras.iter_extras(model) if e.name in entries])
            remove_adapters(installed)
        finally:
            del model.__dict__.get(FROZEN_ATTR, [])[frozen_before:]
            snapshot.restore()
        raise


def _is_extra(key: str) -> bool:
    return any(f".{c}." in key for c in _EXTRA_CONTAINERS)
