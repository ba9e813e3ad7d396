"""PEFT interop: export an adapter as a plain PEFT LoRA directory, import a PEFT LoRA directory as ours.

The directory is what PEFT's save_pretrained writes and what PeftModel.from_pretrained and vLLM read:
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, bias "none", ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)
PEFT adds lora_alpha / r · B A to the *original* base weight.

export_peft works for every variant with `lora_factors(layer) -> (A, B, scale)`, the exact low-rank form of
W_merged − W_original: LoRA and DeLoRA at rank r, PiSSA at rank 2r ([B, −B0], [A; A0], alpha doubled, as
PEFT converts it), HRA at rank r (A = Y, B = −W Yᵀ T). Variants whose change is full rank (DoRA, IA3,
IA3-FF, RoAd) are refused; merge() them instead. Factors are written in fp32.

export_peft writes the weights first, then the config, each atomically, and stores the config it is about to
write in the weights file's metadata (`lora_lite_export_config`). An export interrupted between the two leaves
new weights beside the old config; import_peft compares the two and refuses such a pair.

import_peft reads a LoRA directory into our `lora` variant with the same r and scale (rsLoRA's α/√r is
folded into alpha). Targets come from the tensor keys, so PEFT's target_modules/layers_to_transform rules
never need re-implementing. Config fields that change the math (use_dora, bias, rank/alpha patterns,
modules_to_save, ...) are refused, and so is every init_lora_weights other than those known to leave the base
weights alone (True, False, "gaussian", "eva", "orthogonal"): PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite W,
so their adapters are wrong on the original base unless PEFT converted them at save time. The weights file goes
through the same checks as lora_lite.load (one descriptor, header checked before data is read, float dtypes,
names and shapes against the model, finite values within the layers' dtype); the config is strict JSON of at
most validate.MAX_HEADER_BYTES. Tensors are upcast to fp32, like PEFT's default autocast_adapter_dtype=True.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .checked_file import CheckedFile
from .errors import CheckpointError, ConfigError, ConversionError
from .io import atomic_write_bytes, install_entries, plan_entry
from .runtime import adapter_config, adapter_layers, resolve_name
from .typecheck import check_field, short_repr
from .validate import FORMAT, MAX_HEADER_BYTES, FileKind, _bad, check_path, parse_json
from .variants.lora import LoRAConfig

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
EXPORT_KEY = "lora_lite_export_config"  # weights-file metadata: the config export_peft wrote beside it
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Fields that do not change the forward of a trained LoRA (targets are taken from the tensor keys instead).
_HARMLESS = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "lora_dropout", "init_lora_weights", "loftq_config",
             "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
             "runtime_config", "ensure_weight_tying"}
# Fields that describe an export but change neither PEFT's nor our result: an edit of them keeps a pair valid.
_DESCRIPTIVE = {"base_model_name_or_path", "revision", "peft_version", "task_type", "inference_mode", "auto_mapping"}
# init_lora_weights values whose init leaves the base weights as they were (B A = 0, or random A and B).
_KEEPS_BASE = (True, False, "gaussian", "eva", "orthogonal")
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
PEFT_WEIGHTS = FileKind("PEFT weights file", "Re-download it or re-save the adapter with PEFT's "
                        "save_pretrained(safe_serialization=True)")
PEFT_CONFIG = FileKind("PEFT adapter config", "Re-save the adapter with PEFT's save_pretrained")


@torch.no_grad()
def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                name: str | None = None) -> Path:
    """Write adapter `name` (None: the model's only one) as a PEFT LoRA directory that reproduces it on the original
    base model."""
    name = resolve_name(model, name, "export_peft()")
    cfg, layers = adapter_config(model, name), adapter_layers(model, name)
    variant = next(iter(layers.values())).variant
    if not hasattr(variant, "lora_factors"):
        raise ConversionError(
            f"method {cfg.variant!r} cannot be exported as a plain LoRA: its weight change is not low-rank "
            "(it rescales or rotates whole rows or columns), so no LoRA reproduces it exactly. Use lora_lite.merge "
            "to ship merged weights, or lora_lite.save for our own format")
    tensors, ranks, scales = {}, set(), set()
    for lname, a in layers.items():
        A, B, scale = variant.lora_factors(a)
        tensors[f"{PREFIX}{lname}.lora_A.weight"] = A.float().contiguous().cpu()
        tensors[f"{PREFIX}{lname}.lora_B.weight"] = B.float().contiguous().cpu()
        ranks.add(A.shape[0])
        scales.add(float(scale))
    if len(ranks) != 1 or len(scales) != 1:
        raise ConversionError(f"method {cfg.variant!r} gave per-layer ranks {sorted(ranks)} and scales "
                              f"{sorted(scales)}; a PEFT config holds one r and one lora_alpha")
    (r,), (scale,) = ranks, scales
    names = list(layers)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None),
                                                                      "name_or_path", None) or None,
        "r": r, "lora_alpha": scale * r, "target_modules": _target_modules(model, names), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    out = Path(out_dir)
    metadata = {"format": "pt", EXPORT_KEY: json.dumps(config, sort_keys=True)}
    try:
        atomic_write_bytes(out / WEIGHTS_FILE, safetensors_bytes(tensors, metadata=metadata))
        atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    except OSError as e:
        raise CheckpointError(f"export_peft could not write into {str(out)!r} ({e}). If the weights were replaced "
                              "but the config was not, import_peft refuses the pair; free space or fix permissions "
                              "and export again") from None
    return out


def _target_modules(model, names):
    """Leaf names (["q_proj", "v_proj"]) when PEFT's suffix match selects exactly our layers, else full paths."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    selected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(names) else sorted(names)


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str = "default") -> list[str]:
    """Attach the PEFT LoRA in `peft_dir` to `model` as a lora-lite `lora` adapter named `name`."""
    src = _peft_dir(peft_dir)
    conf = _read_config(src / CONFIG_FILE)
    r, alpha = _check_config(conf, src)
    with CheckedFile(src / WEIGHTS_FILE, "import_peft()", PEFT_WEIGHTS) as f:
        _check_export_pair(f.meta, conf, src)
        keys: dict[str, str] = {}  # `<layer>.lora_A` -> the file's key
        for key in f.entries:
            m = _KEY.fullmatch(key)
            if m is None:
                raise ConversionError(f"{str(src)!r} holds {short_repr(key)}, which is not a LoRA A/B weight; "
                                      "embedding LoRA, DoRA magnitudes, biases and modules_to_save cannot be imported")
            keys[f"{m.group(1)}.lora_{m.group(2)}"] = key
        names = sorted({k.rsplit(".", 1)[0] for k in keys})
        incomplete = [n for n in names if f"{n}.lora_A" not in keys or f"{n}.lora_B" not in keys]
        if incomplete or not names:
            raise CheckpointError(f"{str(src)!r}: modules without both lora_A and lora_B: {incomplete[:5]}")
        cfg = LoRAConfig(r=r, alpha=alpha, target_names=tuple(f"^{re.escape(n)}$" for n in names))
        specs = {k: (_upcast(f.entries[fk][0]), f.entries[fk][1]) for k, fk in keys.items()}
        plan = plan_entry(model, name, cfg, names, specs, src)
        raw = f.read(keys.values())
    # a copy in fp32 when 16-bit, like PEFT's autocast_adapter_dtype
    tensors = {k: raw[fk].to(_upcast(raw[fk].dtype)) for k, fk in keys.items()}
    install_entries(model, {name: (cfg, names, tensors)}, {name: plan}, src)
    return [name]


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _peft_dir(peft_dir) -> Path:
    """The PEFT directory, or a CheckpointError that says what was passed instead."""
    if not isinstance(peft_dir, (str, os.PathLike)):
        raise CheckpointError(f"import_peft() needs a directory path (str or os.PathLike), got {type(peft_dir).__name__}")
    src = Path(peft_dir)
    if src.is_file():
        try:
            with CheckedFile(src, "import_peft()") as f:
                ours = f.meta.get("format") == FORMAT
        except CheckpointError:
            ours = False
        if ours:
            raise CheckpointError(f"{str(src)!r} is a lora-lite adapter file, not a PEFT directory; load it with "
                                  "lora_lite.load(model, path)")
        raise CheckpointError(f"{str(src)!r} is a file; import_peft reads a PEFT adapter directory holding "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}. Pass that directory")
    if not src.is_dir():
        raise CheckpointError(f"{str(src)!r} is not a directory; pass the folder PEFT's save_pretrained wrote")
    if not (src / CONFIG_FILE).is_file() or not (src / WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in src.iterdir())
        pickle = " adapter_model.bin is a pickle checkpoint, which lora-lite never loads (unpickling runs code): " \
                 "re-save it in PEFT with safe_serialization=True." if "adapter_model.bin" in found else ""
        raise CheckpointError(f"{str(src)!r} must hold {CONFIG_FILE} and {WEIGHTS_FILE} (found: {found[:10]}).{pickle}")
    return src


def _read_config(path: Path) -> dict:
    """adapter_config.json: a regular file of at most MAX_HEADER_BYTES holding one strict-JSON object."""
    path = check_path(path, "import_peft()")
    with open(path, "rb") as f:
        raw = f.read(MAX_HEADER_BYTES + 1)
    if len(raw) > MAX_HEADER_BYTES:
        raise _bad(path, f"it is larger than {MAX_HEADER_BYTES} bytes", PEFT_CONFIG)
    conf = parse_json(raw, path, "content", PEFT_CONFIG)
    if not isinstance(conf, dict):
        raise _bad(path, f"it holds a JSON {type(conf).__name__}, expected an object", PEFT_CONFIG)
    return conf


def _check_export_pair(meta: dict[str, str], conf: dict, src: Path) -> None:
    """Weights written by export_peft carry the config written beside them; every setting that changes the
    result must still agree (an interrupted export leaves new weights beside an old config)."""
    if EXPORT_KEY not in meta:
        return  # written by PEFT itself
    exported = parse_json(meta[EXPORT_KEY].encode(), src / WEIGHTS_FILE, f"{EXPORT_KEY} metadata", PEFT_WEIGHTS)
    if not isinstance(exported, dict):
        raise CheckpointError(f"{str(src)!r}: the {EXPORT_KEY} metadata of {WEIGHTS_FILE} is not an object; "
                              "export the adapter again")
    differing = sorted(k for k, v in exported.items() if k not in _DESCRIPTIVE and conf.get(k) != v)
    if differing:
        shown = ", ".join(f"{k}: {short_repr(conf.get(k))} vs {short_repr(exported[k])}" for k in differing[:4])
        raise CheckpointError(f"{str(src)!r}: {CONFIG_FILE} is not the config export_peft wrote with these weights "
                              f"({shown}, config vs weights). The export was interrupted or one file was replaced; "
                              "export again")


def _check_config(conf: dict, src: Path) -> tuple[int, float]:
    if conf.get("peft_type") != "LORA":
        raise ConversionError(f"{str(src)!r} is a PEFT {short_repr(conf.get('peft_type'))} adapter; only LORA can be "
                              "imported")
    init = conf.get("init_lora_weights", True)
    if not any(type(init) is type(v) and (init.lower() if isinstance(init, str) else init) == v for v in _KEEPS_BASE):
        if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
            raise ConversionError(f"{str(src)!r} was saved with init_lora_weights={init!r}, so it expects PEFT's "
                                  "rewritten residual base. Re-save it in PEFT with "
                                  "path_initial_model_for_weight_conversion")
        raise ConversionError(f"{str(src)!r} has init_lora_weights={short_repr(init)}, which lora-lite does not know "
                              f"to leave the base weights alone (known: {', '.join(map(repr, _KEEPS_BASE))}); load "
                              "it with PEFT")
    for key, value in conf.items():
        if key not in _HARMLESS and value not in (None, False, "none", [], {}):
            raise ConversionError(f"{str(src)!r} sets {key}={short_repr(value)}, which changes the LoRA forward in a "
                                  "way lora-lite's lora variant does not reproduce; only plain LoRA (bias='none', no "
                                  "DoRA, no rank/alpha patterns, no modules_to_save) can be imported")
    rslora = conf.get("use_rslora", False)
    try:
        r = check_field(LoRAConfig, "r", conf.get("r"))
        alpha = check_field(LoRAConfig, "alpha", conf.get("lora_alpha"))
        if not isinstance(rslora, bool) or r < 1:
            raise ConfigError("expected r >= 1 and use_rslora true or false")
        # rsLoRA scales by alpha/√r; our scale is alpha/r, so alpha·√r gives the same factor.
        return r, check_field(LoRAConfig, "alpha", alpha * math.sqrt(r) if rslora else alpha)
    except ConfigError as e:
        raise CheckpointError(f"{str(src)!r} has r={short_repr(conf.get('r'))}, lora_alpha="
                              f"{short_repr(conf.get('lora_alpha'))}, use_rslora={short_repr(rslora)}: {e}") from None
