"""Checks on an adapter file, run before safetensors maps its data and before the model is touched.

An adapter file may come from a stranger, so nothing in it is trusted:
  header    read by hand first. Its declared length must fit inside the file (and MAX_HEADER_BYTES); it must
            be a UTF-8 JSON object with no duplicate keys and no NaN literals; every tensor entry needs a float
            dtype (F16, BF16, F32, F64), a shape whose byte size equals its offsets, and the offsets must tile
            the data section exactly (no gap, no overlap, nothing past the end). A file that declares terabytes
            is refused before anything is allocated: memory stays within the file's size.
  metadata  format, format_version (1 or 2), per adapter a config that rebuilds a typed AdapterConfig and a
            list of unique targets, and optionally: `layers` (per-layer r / alpha from rank_pattern /
            alpha_pattern, for targets only), `modules_to_save` (module names) and `token_rows` ({"embedding",
            "tied_head"} names); every tensor key belongs to one adapter.
  values    every tensor must be finite. NaN/inf is refused (the run that wrote it diverged); never loaded.
  model     every target must be a layer of a kind lora-lite adapts (linear, Conv1D, conv, embedding, or an
            expert parameter `<experts module>.lora_experts.<parameter>`); every tensor's name, shape and dtype
            must be what the method would create on that layer (with that layer's stored r / alpha); modules
            trained whole and token rows must exist, with every parameter / the rows' shape matching.
Any failure raises CheckpointError (UnknownVariantError for an unregistered variant) naming the file.

Target layers are resolved by their exact names in the file; the config's regexes are never run at load
time, so a hostile pattern cannot stall load (catastrophic backtracking).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import torch
from torch import nn

from . import experts
from .config import LAYER_FIELDS, AdapterConfig, for_layer
from .errors import AttachStateError, CheckpointError, ConfigError, TargetError
from .extras import SAVED, TOKENS
from .layer_kinds import kind_of
from .runtime import _NAME, CONTAINER, plan_layer, stored_shape
from .target import d_model, role_of
from .typecheck import check_field, short_repr

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
MAX_HEADER_BYTES = 8 * 2**20  # ~100 bytes per tensor entry: room for ~80k adapter tensors
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_ADAPTER_KEYS, _OPTIONAL_KEYS = {"config", "targets"}, {"layers", "modules_to_save", "token_rows"}


def check_path(path: str | os.PathLike) -> Path:
    try:
        path = Path(path)
        mode = path.stat().st_mode
    except TypeError:
        raise CheckpointError(f"load() needs a file path (str or os.PathLike), got {type(path).__name__}") from None
    except OSError as e:
        raise CheckpointError(f"adapter file {str(path)!r} cannot be opened ({e.strerror}); pass the path "
                              "lora_lite.save() wrote") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{str(path)!r} is a directory; load() reads one .safetensors file written by "
                              "lora_lite.save(). Pass that file's path (PEFT directories go through import_peft)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file (a pipe, socket or device); copy the adapter "
                              "to a regular .safetensors file first")
    return path


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """(metadata, {tensor name: (dtype, shape)}) from a safetensors file, checked without trusting any size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"it has {size} bytes, fewer than the 8-byte header length every safetensors file "
                             "starts with; the file is truncated or empty")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path, f"it declares a {n}-byte header but holds {size - 8} bytes after the length field "
                             f"(limit {MAX_HEADER_BYTES}); the file is truncated or corrupt")
        raw = f.read(n)
    header = _parse_json(raw, path, "header")
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "its __metadata__ must be an object of strings")
    entries, spans = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _check_entry(name, entry, path)
        entries[name] = (dtype, shape)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _bad(path, f"tensor {name!r} starts at byte {begin} of the data section, expected {position}: "
                             "tensors overlap or leave a gap")
        position = end
    if position != size - 8 - n:
        raise _bad(path, f"its tensors cover {position} bytes but the data section has {size - 8 - n}; the file "
                         "is truncated or has trailing bytes")
    return meta, entries


def _check_entry(name: str, entry, path: Path):
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _bad(path, f"header entry {name!r} must be an object with keys {sorted(_ENTRY_KEYS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _bad(path, f"tensor {name!r} has dtype {short_repr(dtype)}; adapter tensors are floating point "
                         f"({', '.join(_DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_size(d) for d in shape)):
        raise _bad(path, f"tensor {name!r} has shape {short_repr(shape)}; expected a list of at most 8 sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has data_offsets {short_repr(offsets)}; expected [begin, end]")
    nbytes = _DTYPES[dtype].itemsize
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes but its "
                         f"offsets {offsets} span {offsets[1] - offsets[0]}")
    return _DTYPES[dtype], tuple(shape), offsets


def parse_metadata(meta: dict[str, str], path: Path) -> dict[str, tuple[AdapterConfig, list[str]]]:
    """{adapter name: (config, targets, info)} from a v1 or v2 file's metadata; info holds the optional keys."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a lora-lite adapter (metadata format={short_repr(meta.get('format'))}, "
                              f"expected {FORMAT!r}); for PEFT directories use lora_lite.import_peft")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{str(path)!r} has format_version {short_repr(version)}; this lora-lite reads versions "
                              f"{', '.join(READABLE_VERSIONS)}. Upgrade lora-lite or re-save the adapter")
    if version == "1":
        for key in ("config", "targets"):
            if key not in meta:
                raise CheckpointError(f"{str(path)!r} lacks the {key!r} metadata entry; re-save it with lora_lite.save")
        config = _parse_json(meta["config"].encode(), path, "config metadata")
        targets = _parse_json(meta["targets"].encode(), path, "targets metadata")
        return {"default": (_config(_from_v1(config), path), _targets(targets, path), {})}
    if "adapters" not in meta:
        raise CheckpointError(f"{str(path)!r} lacks the 'adapters' metadata entry; re-save it with lora_lite.save")
    adapters = _parse_json(meta["adapters"].encode(), path, "adapters metadata")
    if not (isinstance(adapters, dict) and adapters):
        raise _bad(path, f"its 'adapters' metadata is {short_repr(adapters)}; expected an object of adapters")
    out = {}
    for name, entry in adapters.items():
        if not _NAME.fullmatch(name):
            raise _bad(path, f"adapter name {short_repr(name)} is not 1-64 letters, digits, '_' or '-'")
        if not (isinstance(entry, dict) and _ADAPTER_KEYS <= set(entry) <= _ADAPTER_KEYS | _OPTIONAL_KEYS):
            raise _bad(path, f"adapter {name!r} must be an object with keys 'config' and 'targets' (and optionally "
                             f"{sorted(_OPTIONAL_KEYS)})")
        cfg, targets = _config(entry["config"], path), _targets(entry["targets"], path)
        out[name] = (cfg, targets, _info(entry, cfg, targets, path))
    return out


def _info(entry: dict, cfg: AdapterConfig, targets: list[str], path: Path) -> dict:
    """The optional keys of an adapter entry, type-checked (their fit to the model is checked later)."""
    info = {}
    layers = entry.get("layers", {})
    if not (isinstance(layers, dict) and set(layers) <= set(targets)):
        raise _bad(path, "its per-layer 'layers' metadata must be an object keyed by the adapter's targets")
    fields = {k for k in LAYER_FIELDS if hasattr(cfg, k)}
    for lname, values in layers.items():
        if not (isinstance(values, dict) and values and set(values) <= fields):
            raise _bad(path, f"layer {short_repr(lname)} has per-layer values {short_repr(values)}; expected an "
                             f"object with some of {sorted(fields)}")
        try:
            checked = {k: check_field(type(cfg), k, v) for k, v in values.items()}
            for_layer(cfg, checked)  # r >= 1, finite alpha: the config's own checks
        except ConfigError as e:
            raise CheckpointError(f"{str(path)!r}: layer {short_repr(lname)}: {e}") from None
        info.setdefault("layers", {})[lname] = checked
    if "modules_to_save" in entry:
        saved = entry["modules_to_save"]
        if not (isinstance(saved, list) and saved and all(isinstance(n, str) and n for n in saved)
                and len(set(saved)) == len(saved)):
            raise _bad(path, f"its modules_to_save metadata is {short_repr(saved)}; expected unique module names")
        info["modules_to_save"] = saved
    if "token_rows" in entry:
        rows = entry["token_rows"]
        if not (isinstance(rows, dict) and set(rows) == {"embedding", "tied_head"}
                and isinstance(rows["embedding"], str) and isinstance(rows["tied_head"], (str, type(None)))):
            raise _bad(path, f"its token_rows metadata is {short_repr(rows)}; expected "
                             '{"embedding": name, "tied_head": name or null}')
        info["token_rows"] = rows
    return info


def _from_v1(config):
    """v1 configs carried r and alpha for every method; drop them where the method has none."""
    if isinstance(config, dict) and isinstance(config.get("variant"), str):
        from .variant import REGISTRY

        cls = REGISTRY.get(config["variant"])
        if cls is not None:
            fields = {f.name for f in dataclasses.fields(cls.config)}
            config = {k: v for k, v in config.items() if k in fields or k not in ("r", "alpha")}
    return config


def _config(config, path: Path) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{str(path)!r} has an invalid config: {e}") from None


def _targets(targets, path: Path) -> list[str]:
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise _bad(path, f"its targets metadata is {short_repr(targets)}; expected a non-empty list of module names")
    if len(set(targets)) != len(targets):
        raise _bad(path, "its targets metadata names a module twice")
    return targets


def split_tensors(version: str, adapters: dict, tensors: dict[str, torch.Tensor],
                  path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group the file's tensors by adapter, re-keyed `<layer>.<lora tensor>`. Every key must belong to one."""
    if version == "1":
        return {"default": tensors}
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in adapters}
    for key, t in tensors.items():
        for container in (CONTAINER, SAVED, TOKENS):
            lname, sep, rest = key.rpartition(f".{container}.")
            if sep:
                break
        name, _, tname = rest.partition(".")
        if not sep or name not in out or not tname:
            raise _bad(path, f"tensor {short_repr(key)} is not `<layer>.{CONTAINER}.<adapter>.<tensor>` (or "
                             f"{SAVED} / {TOKENS} in place of {CONTAINER}) for an adapter in its metadata "
                             f"({sorted(adapters)})")
        # main tensors keyed `<layer>.<tensor>`, extras keep their container: `<module>.lora_saved.<parameter>`
        out[name][f"{lname}.{tname}" if container == CONTAINER else f"{lname}.{container}.{tname}"] = t
    return out


def check_finite(tensors: dict[str, torch.Tensor], path: Path, writing: bool = False) -> None:
    for key, t in tensors.items():
        if t.numel() == 0:
            continue
        low, high = torch.aminmax(t)  # one pass, no temporaries: NaN propagates, ±inf shows up in low or high
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad = int((~torch.isfinite(t)).sum())
            where = (f"save() refuses to write {str(path)!r} (any file there is unchanged): {key}" if writing
                     else f"{key} in {str(path)!r}")
            raise CheckpointError(f"{where} has {bad} NaN/inf values of {t.numel()}; lora-lite refuses non-finite "
                                  "adapters. The training run diverged: lower the learning rate and save from a "
                                  "finite step")


def resolve_layer(model: nn.Module, lname: str) -> nn.Module | None:
    """The module a file's target names, by exact name; `<experts>.lora_experts.<parameter>` resolves to that
    parameter's placeholder (lora_lite.experts), which a fresh model does not have yet."""
    owner_name, sep, pname = lname.rpartition(f".{experts.HOLDER}.")
    try:
        if sep:
            owner = model.get_submodule(owner_name)
            ok = experts.is_experts_module(owner) and pname in experts.expert_parameter_names(owner)
            return experts.placeholder(owner, pname) if ok else None
        return model.get_submodule(lname)
    except AttributeError:
        return None


def fit_to_model(model: nn.Module, variant: type, cfg: AdapterConfig, name: str, targets: list[str],
                 tensors: dict[str, torch.Tensor], path: Path,
                 layer_values: dict | None = None) -> list[tuple[str, nn.Module, str | None]]:
    """Resolve the file's targets on `model` and check every tensor against them (each layer with its stored
    r / alpha, `layer_values`). Touches nothing."""
    hidden = d_model(model) if cfg.target_roles else 0
    plan, expected = [], {}
    for lname in targets:
        layer = resolve_layer(model, lname)
        if layer is None or layer is model or kind_of(layer) is None:
            raise CheckpointError(f"{str(path)!r} adapts {lname!r}, which is not a layer lora-lite adapts in this "
                                  "model; it was saved for another architecture. Load it onto the base model it was "
                                  "trained on")
        try:
            role = role_of(lname, layer, hidden) if cfg.target_roles else None
            if cfg.target_roles and role not in cfg.target_roles:
                raise TargetError(f"{lname!r} is a {role} layer but the config keeps only {cfg.target_roles}")
            specs = plan_layer(variant, for_layer(cfg, (layer_values or {}).get(lname, {})), name, lname, layer)
        except (ConfigError, TargetError, AttachStateError) as e:
            raise CheckpointError(f"{str(path)!r} does not fit layer {lname!r} of this model: {e}") from None
        dtypes = set()
        for tname, spec in specs.items():
            key = f"{lname}.{tname}"
            expected[key] = stored_shape(layer, spec.shape)
            if key in tensors:
                dtypes.add(tensors[key].dtype)
        if len(dtypes) > 1 or (cfg.dtype is not None and dtypes - {cfg.dtype}):
            want = cfg.dtype or "one float dtype"
            raise CheckpointError(f"the tensors of {lname!r} in {str(path)!r} have dtypes {sorted(map(str, dtypes))}; "
                                  f"expected {want} for all of them. Re-save the adapter with lora_lite.save")
        plan.append((lname, layer, role))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: adapter {name!r} does not match method {cfg.variant!r} on its targets: missing "
                              f"tensors {missing[:5]}, unexpected tensors {unexpected[:5]}. The file is damaged or "
                              "from another version; re-save it")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(f"{key} has shape {tuple(tensors[key].shape)} in {str(path)!r} but this model "
                                  f"needs {tuple(shape)}; the adapter was trained on a different base model")
    return plan


def _parse_json(raw: bytes, path: Path, what: str):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"its {what} is not valid JSON ({short_repr(str(e))})") from None


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} is not a valid lora-lite adapter file: {problem}. Re-download it or "
                           "re-save it with lora_lite.save")
