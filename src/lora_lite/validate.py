"""Checks on an adapter file (or a PEFT weights file), run before its data is read and before the model is touched.

An adapter file may come from a stranger, so nothing in it is trusted. In the order load runs them:
  header    read by hand from the open file (lora_lite.checked_file). Its declared length must fit inside the
            file (and MAX_HEADER_BYTES); it must be a UTF-8 JSON object with no duplicate keys and no NaN
            literals; every tensor entry needs a float dtype (F16, BF16, F32, F64), a shape whose byte size
            equals its offsets, and the offsets must tile the data section exactly (no gap, no overlap, nothing
            past the end). A file that declares terabytes is refused before anything is allocated.
  metadata  format, format_version (1 or 2), per adapter a config that rebuilds a typed AdapterConfig (target
            regexes bounded by lora_lite.patterns), a list of unique targets, and optionally: `layers` (per-layer
            r / alpha from rank_pattern / alpha_pattern, for targets only), `modules_to_save` (module names),
            `token_rows` ({"embedding", "tied_head"} names) and `base_fingerprint`; every tensor key belongs to
            one adapter.
  model     from the header alone: no more targets than the model has adaptable layers; every target a layer
            of a kind lora-lite adapts (linear, Conv1D, conv, embedding, or an expert parameter
            `<experts module>.lora_experts.<parameter>`) under a name named_modules gives (never an attribute
            path such as HF's `base_model`), no module twice; every tensor's name, shape and dtype what the
            method would create on that layer (with that layer's stored r / alpha); modules trained whole and
            token rows must exist, with every parameter / the rows' shape matching; the base fingerprint, where
            stored, matches the layer's weight (lora_lite.fingerprint).
  values    read only now: every tensor finite (NaN/inf means the run diverged) and within the range of the
            dtype of the layer it goes to; for weight-rewriting methods, W - base_delta finite in W's dtype.
Any failure raises CheckpointError (UnknownVariantError for an unregistered variant) naming the file.

Target layers are resolved by their exact names in the file; the config's regexes are never run at load
time, so a hostile pattern cannot stall load (catastrophic backtracking).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from . import experts, fingerprint
from .config import LAYER_FIELDS, AdapterConfig, for_layer
from .errors import AttachStateError, CheckpointError, ConfigError, TargetError
from .extras import SAVED, TOKENS
from .layer_kinds import kind_of
from .runtime import (
    _NAME,
    CONTAINER,
    Adapter,
    bare_name,
    base_matrix,
    base_weight,
    plan_layer,
    residual,
    stored_shape,
)
from .target import d_model, role_of
from .typecheck import check_field, short_repr
from .variant import rewrites_weight

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
MAX_HEADER_BYTES = 8 * 2**20  # ~100 bytes per tensor entry: room for ~80k adapter tensors
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_ADAPTER_KEYS = {"config", "targets"}
_OPTIONAL_KEYS = {"layers", "modules_to_save", "token_rows", "base_fingerprint"}


@dataclass(frozen=True)
class FileKind:
    """What an untrusted file was meant to be, for messages: 'is not a valid <label>: <problem>. <fix>'."""

    label: str
    fix: str


ADAPTER_FILE = FileKind("lora-lite adapter file", "Re-download it or re-save it with lora_lite.save")


def check_path(path: str | os.PathLike, what: str = "load()") -> Path:
    try:
        path = Path(path)
        mode = path.stat().st_mode
    except TypeError:
        raise CheckpointError(f"{what} needs a file path (str or os.PathLike), got {type(path).__name__}") from None
    except OSError as e:
        raise CheckpointError(f"adapter file {str(path)!r} cannot be opened ({e.strerror}); pass the path "
                              "lora_lite.save() wrote") from None
    check_mode(mode, path)
    return path


def check_mode(mode: int, path: Path) -> None:
    """A regular file (the mode of the path, or of the descriptor opened on it)."""
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{str(path)!r} is a directory; load() reads one .safetensors file written by "
                              "lora_lite.save(). Pass that file's path (PEFT directories go through import_peft)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file (a pipe, socket or device); copy the adapter "
                              "to a regular .safetensors file first")


def read_header(f: BinaryIO, size: int, path: Path, kind: FileKind = ADAPTER_FILE) -> tuple[
        dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, tuple[int, int]]]:
    """(metadata, {tensor: (dtype, shape)}, {tensor: (begin, end) byte offsets in the file}) from an open
    safetensors file of `size` bytes, checked without trusting any size it declares; errors call it a `kind`."""
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _bad(path, f"it has {size} bytes, fewer than the 8-byte header length every safetensors file "
                         "starts with; the file is truncated or empty", kind)
    n = int.from_bytes(prefix, "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise _bad(path, f"it declares a {n}-byte header but holds {size - 8} bytes after the length field "
                         f"(limit {MAX_HEADER_BYTES}); the file is truncated or corrupt", kind)
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "it ended inside its own header; the file is truncated", kind)
    header = parse_json(raw, path, "header", kind)
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a JSON {type(header).__name__}, expected an object", kind)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "its __metadata__ must be an object of strings", kind)
    entries, offsets, spans = {}, {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _check_entry(name, entry, path, kind)
        entries[name] = (dtype, shape)
        offsets[name] = (8 + n + begin, 8 + n + end)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _bad(path, f"tensor {name!r} starts at byte {begin} of the data section, expected {position}: "
                             "tensors overlap or leave a gap", kind)
        position = end
    if position != size - 8 - n:
        raise _bad(path, f"its tensors cover {position} bytes but the data section has {size - 8 - n}; the file "
                         "is truncated or has trailing bytes", kind)
    return meta, entries, offsets


def _check_entry(name: str, entry, path: Path, kind: FileKind):
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _bad(path, f"header entry {name!r} must be an object with keys {sorted(_ENTRY_KEYS)}", kind)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _bad(path, f"tensor {name!r} has dtype {short_repr(dtype)}; adapter tensors are floating point "
                         f"({', '.join(_DTYPES)})", kind)
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_size(d) for d in shape)):
        raise _bad(path, f"tensor {name!r} has shape {short_repr(shape)}; expected a list of at most 8 sizes >= 0", kind)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has data_offsets {short_repr(offsets)}; expected [begin, end]", kind)
    nbytes = _DTYPES[dtype].itemsize
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes but its "
                         f"offsets {offsets} span {offsets[1] - offsets[0]}", kind)
    return _DTYPES[dtype], tuple(shape), offsets


def parse_metadata(meta: dict[str, str], path: Path) -> dict[str, tuple[AdapterConfig, list[str], dict]]:
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
        config = parse_json(meta["config"].encode(), path, "config metadata")
        targets = parse_json(meta["targets"].encode(), path, "targets metadata")
        return {"default": (_config(_from_v1(config), path), _targets(targets, path), {})}
    if "adapters" not in meta:
        raise CheckpointError(f"{str(path)!r} lacks the 'adapters' metadata entry; re-save it with lora_lite.save")
    adapters = parse_json(meta["adapters"].encode(), path, "adapters metadata")
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
        info = _info(entry, cfg, targets, path)
        if "base_fingerprint" in entry:
            info["base_fingerprint"] = _fingerprints(entry["base_fingerprint"], targets, name, path)
        out[name] = (cfg, targets, info)
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
def _fingerprints(value, targets: list[str], name: str, path: Path) -> dict[str, list[float]]:
    def is_stat(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(value, dict) and set(value) == set(targets)
            and all(isinstance(v, list) and len(v) == fingerprint.SIZE and all(map(is_stat, v)) for v in value.values())):
        raise _bad(path, f"adapter {name!r} has a base_fingerprint that is not one list of {fingerprint.SIZE} finite "
                         "numbers per target layer")
    return {k: [float(x) for x in v] for k, v in value.items()}


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


def split_keys(version: str, adapters: dict, keys, path: Path) -> dict[str, dict[str, str]]:
    """{adapter: {`<layer>.<lora tensor>`: the file's key}}. Every key must belong to one adapter."""
    if version == "1":
        return {"default": {k: k for k in keys}}
    out: dict[str, dict[str, str]] = {name: {} for name in adapters}
    for key in keys:
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
        out[name][f"{lname}.{tname}" if container == CONTAINER else f"{lname}.{container}.{tname}"] = key
    return out


def check_values(tensors: dict[str, torch.Tensor], path: Path, writing: bool = False,
                 layer_dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Every tensor finite and, with `layer_dtypes` ({layer: dtype}), within the range of the dtype of the layer
    it goes to (`<layer>.<tensor>` keys): the hook casts adapter tensors to the activation dtype, so a larger
    value would turn into inf there."""
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
        dtype = (layer_dtypes or {}).get(key.rsplit(".", 1)[0])
        if dtype is not None and max(-float(low), float(high)) > torch.finfo(dtype).max:
            raise CheckpointError(f"{key} in {str(path)!r} holds {max(-float(low), float(high)):.3g}, beyond the "
                                  f"largest {dtype} value ({torch.finfo(dtype).max:.3g}) of the layer it goes to: "
                                  "the hook computes in that dtype, where it would be inf. The file is corrupt, or "
                                  "was trained for a wider dtype: load it onto a float32 base")


def compute_dtypes(plan: list[tuple[str, nn.Module, str | None]]) -> dict[str, torch.dtype]:
    """{layer: the float dtype its adapters compute in}: its weight's, or a quantized layer's compute_dtype."""
    out = {}
    for lname, layer, _ in plan:
        dtype = layer.weight.dtype if layer.weight.dtype.is_floating_point else getattr(layer, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            out[lname] = dtype
    return out


def check_residuals(variant: type, cfg: AdapterConfig, name: str, plan, tensors: dict[str, torch.Tensor],
                    path: Path) -> None:
    """For a weight-rewriting method: W - base_delta, as install would write it, must be finite in W's dtype."""
    if not rewrites_weight(variant):
        return
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        lname, tname = key.rsplit(".", 1)
        by_layer.setdefault(lname, {})[tname] = t
    for lname, layer, role in plan:
        probe = Adapter(name, layer, cfg, variant, role, order=-1)  # never registered on the layer
        for tname, t in by_layer[lname].items():
            probe.register_buffer(tname, t)
        probe.original_weight = base_weight(layer)
        if not torch.isfinite(residual(probe)).all():
            raise CheckpointError(f"{str(path)!r}: adapter {name!r} would write non-finite weights into {lname!r}: "
                                  f"W - base_delta of method {cfg.variant!r} overflows {layer.weight.dtype}. Its "
                                  "frozen factors are corrupt or belong to another base; re-save it from the model "
                                  "it was trained on")


def check_fingerprints(variant: type, name: str, plan, stored: dict[str, list[float]] | None, path: Path) -> None:
    """The base each layer had when the adapter was saved must be the one it is loaded onto (within rounding)."""
    if stored is None:
        return
    for lname, layer, _ in plan:
        current = fingerprint.of_weight(base_matrix(layer))
        if not fingerprint.matches(stored[lname], current):
            raise CheckpointError(f"{str(path)!r}: adapter {name!r} was saved from another base model: the weight of "
                                  f"{lname!r} does not match the fingerprint stored with it "
                                  f"({fingerprint.describe(stored[lname], current)}). Method {variant.name!r} stores "
                                  "values computed from the base weights, so it only works on the base it was "
                                  "trained on (in any float dtype); load it onto that model")


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} under every name it is registered as (aliases included), also without the segments wrappers
    insert. Names are what named_modules gives, never attribute lookups, so an HF property such as `base_model`
    cannot create a second name for a layer."""
    out = {}
    for lname, module in model.named_modules(remove_duplicate=False):
        if lname:
            out[lname] = out[bare_name(lname)] = module
    return out


def adaptable_count(modules: dict[str, nn.Module]) -> int:
    """How many distinct targets a file could name on this model: layers of a kind lora-lite adapts, plus one per
    expert parameter."""
    distinct = {id(m): m for m in modules.values()}.values()
    return sum(len(experts.expert_parameter_names(m)) if experts.is_experts_module(m) else kind_of(m) is not None
               for m in distinct)


def resolve_layer(modules: dict[str, nn.Module], lname: str) -> nn.Module | None:
    """The module a file's target names, by exact name; `<experts>.lora_experts.<parameter>` resolves to that
    parameter's placeholder (lora_lite.experts), which a fresh model does not have yet."""
    owner_name, sep, pname = lname.rpartition(f".{experts.HOLDER}.")
    if sep:
        owner = modules.get(owner_name)
        ok = owner is not None and experts.is_experts_module(owner) and pname in experts.expert_parameter_names(owner)
        return experts.placeholder(owner, pname) if ok else None
    return modules.get(lname)


def fit_to_model(model: nn.Module, variant: type, cfg: AdapterConfig, name: str, targets: list[str],
                 specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], path: Path,
                 layer_values: dict | None = None) -> list[tuple[str, nn.Module, str | None]]:
    """Resolve the file's targets on `model` and check every tensor's name, dtype and shape (`specs`, from the
    header) against them (each layer with its stored r / alpha, `layer_values`). Reads no tensor data and
    touches nothing."""
    modules = named_modules(model)
    n_layers = adaptable_count(modules)
    if len(targets) > n_layers:  # refused before any per-target work: a file may name 100k layers
        raise CheckpointError(f"{str(path)!r}: adapter {name!r} adapts {len(targets)} layers but this model has "
                              f"{n_layers} layers lora-lite can adapt; it was saved for another architecture")
    hidden = d_model(model) if cfg.target_roles else 0
    plan, expected, seen = [], {}, {}
    for lname in targets:
        layer = resolve_layer(modules, lname)
        if layer is None or layer is model or kind_of(layer) is None:
            raise CheckpointError(f"{str(path)!r} adapts {lname!r}, which is not a layer lora-lite adapts in this "
                                  "model; it was saved for another architecture. Load it onto the base model it was "
                                  "trained on")
        if id(layer) in seen:
            raise CheckpointError(f"{str(path)!r}: adapter {name!r} names one layer twice ({seen[id(layer)]!r} and "
                                  f"{lname!r} are the same module); the file is damaged or hand-edited. Re-save it")
        seen[id(layer)] = lname
        try:
            role = role_of(lname, layer, hidden) if cfg.target_roles else None
            if cfg.target_roles and role not in cfg.target_roles:
                raise TargetError(f"{lname!r} is a {role} layer but the config keeps only {cfg.target_roles}")
            layer_specs = plan_layer(variant, for_layer(cfg, (layer_values or {}).get(lname, {})), name, lname, layer)
        except (ConfigError, TargetError, AttachStateError) as e:
            raise CheckpointError(f"{str(path)!r} does not fit layer {lname!r} of this model: {e}") from None
        dtypes = set()
        for tname, spec in layer_specs.items():
            key = f"{lname}.{tname}"
            expected[key] = stored_shape(layer, spec.shape)
            if key in specs:
                dtypes.add(specs[key][0])
        if len(dtypes) > 1 or (cfg.dtype is not None and dtypes - {cfg.dtype}):
            want = cfg.dtype or "one float dtype"
            raise CheckpointError(f"the tensors of {lname!r} in {str(path)!r} have dtypes {sorted(map(str, dtypes))}; "
                                  f"expected {want} for all of them. Re-save the adapter with lora_lite.save")
        plan.append((lname, layer, role))
    missing, unexpected = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: adapter {name!r} does not match method {cfg.variant!r} on its targets: missing "
                              f"tensors {missing[:5]}, unexpected tensors {unexpected[:5]}. The file is damaged or "
                              "from another version; re-save it")
    for key, shape in expected.items():
        if tuple(specs[key][1]) != tuple(shape):
            raise CheckpointError(f"{key} has shape {tuple(specs[key][1])} in {str(path)!r} but this model "
                                  f"needs {tuple(shape)}; the adapter was trained on a different base model")
    return plan


def parse_json(raw: bytes, path: Path, what: str, kind: FileKind = ADAPTER_FILE):
    """Strict JSON (UTF-8, no duplicate keys, no NaN/Infinity); errors call the file a `kind`."""
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
        raise _bad(path, f"its {what} is not valid JSON ({short_repr(str(e))})", kind) from None


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _bad(path: Path, problem: str, kind: FileKind = ADAPTER_FILE) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} is not a valid {kind.label}: {problem}. {kind.fix}")
