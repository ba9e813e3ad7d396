"""PEFT interop: export an adapter as a plain PEFT LoRA directory, import a PEFT LoRA directory as ours.

The directory is what PEFT's save_pretrained writes and what PeftModel.from_pretrained and vLLM read:
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, bias "none", ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)
PEFT adds lora_alpha / r · B A to the *original* base weight. Every layer kind maps onto PEFT's own layer
(lora_lite.peft_layout): Conv1D (fan_in_fan_out), lora.Conv1d/2d/3d, lora.Embedding (lora_embedding_A/B), expert
parameters (target_parameters, ParamWrapper); per-layer r and alpha go to rank_pattern / alpha_pattern (exact
names), modules trained whole to modules_to_save, trainable embedding rows to trainable_token_indices.

export_peft works for every variant with `lora_factors(layer) -> (A, B, scale)`, the exact low-rank form of
W_merged − W_original: LoRA and DeLoRA at rank r, PiSSA at rank 2r ([B, −B0], [A; A0], alpha doubled, as
PEFT converts it), HRA at rank r (A = Y, B = −W Yᵀ T). Variants whose change is full rank (DoRA, IA3,
IA3-FF, RoAd) are refused; merge() them instead. Factors are written in fp32.

export_peft refuses, before writing anything, what PEFT's loader would not reproduce: conv layers with dilation
or a padding mode PEFT's conv LoRA drops, and targets that PEFT's transformers-v5 MoE conversion re-reads as
expert parameters (on DeepSeek-V3, Qwen3-MoE and the other models it converts, a dense or shared-expert
`gate_proj` / `up_proj` / `down_proj` target becomes the experts' parameter, and its adapter is dropped with
only a warning). That check runs PEFT's own conversion, so it needs peft installed for those model types.

import_peft reads a LoRA directory into our `lora` variant with the same r, lora_alpha and use_rslora (rsLoRA
stays the option, s = alpha/√r on each layer), on every layer kind above, with rank_pattern / alpha_pattern
resolved per layer by PEFT's rule, fan_in_fan_out, modules_to_save, target_parameters and trainable_token_indices. Targets come from the
tensor keys, so PEFT's target_modules/layers_to_transform rules never need re-implementing. Config fields that
change the math (use_dora, bias, ...) are refused, as are adapters that expect a rewritten base (PiSSA/OLoRA/
CorDA/LoftQ/LoRA-GA saved without conversion). Tensors are upcast to fp32, like PEFT's default autocast_adapter_dtype.

export_peft writes the weights first, then the config, each atomically, and stores the config it is about to
write in the weights file's metadata (`lora_lite_export_config`). An export interrupted between the two leaves
new weights beside the old config; import_peft compares the two and refuses such a pair.

import_peft refuses every init_lora_weights other than those known to leave the base weights alone (True,
False, "gaussian", "eva", "orthogonal"): PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite W, so their adapters
are wrong on the original base unless PEFT converted them at save time. The weights file is opened once
(lora_lite.checked_file: header checked before data is read, float dtypes only); names and shapes are checked
against the model and values must be finite within the layers' dtype before anything is attached. The config
is strict JSON of at most validate.MAX_HEADER_BYTES.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import experts, extras
from .checked_file import CheckedFile
from .errors import CheckpointError, ConfigError, ConversionError
from .experts import ExpertSlice
from .io import atomic_write_bytes, attach_entries
from .layer_kinds import kind_of
from .peft_layout import (
    PREFIX,
    TOKENS_KEY,
    check_exportable,
    experts_prefix,
    from_peft,
    peft_targeted,
    to_peft,
)
from .runtime import adapter_config, adapter_extras, adapter_layers, resolve_name
from .target import INTERNAL
from .typecheck import check_field, short_repr
from .validate import FORMAT, MAX_HEADER_BYTES, FileKind, _bad, check_path, parse_json
from .variants.lora import LoRAConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
EXPORT_KEY = "lora_lite_export_config"  # weights-file metadata: the config export_peft wrote beside it
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
# Fields that do not change the forward of a trained LoRA (targets are taken from the tensor keys instead), and
# the ones import_peft reads (per-layer r / alpha, what else trains).
_HARMLESS = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "lora_dropout", "init_lora_weights", "loftq_config",
             "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
             "runtime_config", "ensure_weight_tying", "fan_in_fan_out"}
_READ = {"rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters", "trainable_token_indices"}
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
    base model. Checks everything before writing."""
    name = resolve_name(model, name, "export_peft()")
    cfg, layers = adapter_config(model, name), adapter_layers(model, name)
    variant = next(iter(layers.values())).variant
    if not hasattr(variant, "lora_factors"):
        raise ConversionError(
            f"method {cfg.variant!r} cannot be exported as a plain LoRA: its weight change is not low-rank "
            "(it rescales or rotates whole rows or columns), so no LoRA reproduces it exactly. Use lora_lite.merge "
            "to ship merged weights, or lora_lite.save for our own format")
    targeted: dict[int, set[str]] = {}
    for a in layers.values():
        if a.kind == "experts":
            targeted.setdefault(id(a.base.owner), set()).add(a.base.param_name)
    tensors, per_layer, modules, params = {}, {}, [], []
    for lname, a in layers.items():
        check_exportable(lname, a.base, a.kind)
        if a.kind == "experts":
            owner_name = lname.rsplit(f".{experts.HOLDER}.", 1)[0]
            factors = [variant.lora_factors(ExpertSlice(a, e)) for e in range(a.base.num_experts)]
            A, B = torch.stack([f[0].float() for f in factors]), torch.stack([f[1].float() for f in factors])
            scales = {float(f[2]) for f in factors}
            if len(scales) != 1:
                raise ConversionError(f"{lname!r}: experts have different scales {sorted(scales)}; PEFT holds one")
            (scale,) = scales
            key = experts_prefix(owner_name, a.base.owner, targeted[id(a.base.owner)], a.base.param_name)
            pattern_name = f"{owner_name}.{a.base.param_name}"
            params.append(pattern_name)
        else:
            A, B, scale = variant.lora_factors(a)
            key = pattern_name = lname
            modules.append(lname)
        for k, t in to_peft(key, a.kind, a.base, A.float().cpu(), B.float().cpu()).items():
            tensors[k] = t.contiguous()
        rank = A.shape[-2]
        per_layer[pattern_name] = (rank, float(scale) * rank)
    (r, _), = Counter(v[0] for v in per_layer.values()).most_common(1)
    (alpha, _), = Counter(v[1] for v in per_layer.values()).most_common(1)
    holders = adapter_extras(model, name)
    extras_meta, extras_tensors = extras.entry(model, name)
    saved = extras_meta.get("modules_to_save", [])
    for key, t in extras_tensors.items():
        if f".{extras.SAVED}." in key:
            module, _, pname = key.partition(f".{extras.SAVED}.")
            tensors[f"{PREFIX}{module}.{pname}"] = t.float()
        else:
            tensors[f"{PREFIX}{key.partition(f'.{extras.TOKENS}.')[0]}.{TOKENS_KEY}"] = t.float()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None),
                                                                      "name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "target_modules": _target_modules(model, modules), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": any(a.kind == "conv1d_gpt2" for a in layers.values()),
        "target_parameters": sorted(params) or None,
        "rank_pattern": {re.escape(n): v[0] for n, v in per_layer.items() if v[0] != r},
        "alpha_pattern": {re.escape(n): v[1] for n, v in per_layer.items() if v[1] != alpha},
        "modules_to_save": saved or None,
        "trainable_token_indices": next((h.ids.tolist() for h in holders
                                         if isinstance(h, extras.TokenRows) and not h.tied), None),
    }
    _refuse_what_peft_drops(model, config, layers)
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
    if not names:
        return []
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    selected = {n for n, _ in model.named_modules()
                if n.rsplit(".", 1)[-1] in leaves and not any(s in n.split(".") for s in INTERNAL)}
    return sorted(leaves) if selected == set(names) else sorted(names)


def _refuse_what_peft_drops(model: nn.Module, config: dict, layers: dict) -> None:
    """Run PEFT's transformers-v5 MoE config conversion on what we would write: a target it moves onto expert
    parameters would lose its adapter when PEFT loads the directory (PEFT only warns about the unused weights)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers < 5: PEFT converts nothing
        return
    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None or not config["target_modules"]:
        return
    try:
        import peft
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        raise ConversionError(f"export_peft of a {model_type!r} model needs peft installed: PEFT's loader converts "
                              "that architecture's targets, and lora-lite runs that conversion to check no adapter "
                              "is lost. pip install peft, or use lora_lite.save") from None
    probe = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=list(config["target_modules"]),
                            target_parameters=list(config["target_parameters"] or []))
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    moved = sorted(set(config["target_modules"]) - set(probe.target_modules or []))
    if moved:
        lost = [n for n in layers if n in moved or n.rsplit(".", 1)[-1] in moved]
        raise ConversionError(
            f"PEFT's loader for {model_type!r} models re-reads the targets {moved} as expert parameters "
            f"(transformers v5 MoE conversion), so the adapters of {lost[:8]}{' ...' if len(lost) > 8 else ''} "
            "would be dropped with only a warning. Nothing was written. Leave those layers out "
            "(exclude_names) to export the rest, or share the adapter with lora_lite.save")


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str = "default") -> list[str]:
    """Attach the PEFT LoRA in `peft_dir` to `model` as a lora-lite `lora` adapter named `name`."""
    src = _peft_dir(peft_dir)
    conf = _read_config(src / CONFIG_FILE)
    r, alpha, rslora = _check_config(conf, src)
    with CheckedFile(src / WEIGHTS_FILE, "import_peft()", PEFT_WEIGHTS) as f:
        _check_export_pair(f.meta, conf, src)
        tensors = f.read(f.entries)
    modules = dict(model.named_modules())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    rows = None
    for key, t in tensors.items():
        # a copy, never a view of the file's memory map; 16-bit upcast like PEFT's autocast_adapter_dtype
        t = t.to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype, copy=True)
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        m = _LORA_KEY.fullmatch(rest or "")
        if m is not None:
            factors.setdefault(m.group(1), {})["A" if m.group(2) in ("lora_A.weight", "lora_embedding_A") else "B"] = t
        elif rest is not None and rest.endswith(f".{TOKENS_KEY}"):
            rows = (rest[:-len(TOKENS_KEY) - 1], t)
        elif rest is not None and (owner := _saved_owner(rest, modules, conf)) is not None:
            saved.setdefault(owner, {})[rest[len(owner) + 1:]] = t
        elif rest is not None and (weight := _embedding_weight(rest, modules)) is not None:
            # PEFT's save_embedding_layers stores the embedding it was trained on: it must be this model's
            if not torch.equal(weight.detach().cpu().to(t.dtype), t):
                raise ConversionError(f"{str(src)!r} carries its own {key!r} (PEFT's save_embedding_layers), which "
                                      "differs from this model's embedding: the adapter was trained on a resized or "
                                      "trained embedding. Load that base (e.g. resize_token_embeddings) first")
        else:
            raise ConversionError(f"{str(src)!r} holds {key!r}, which is not a LoRA A/B weight, a modules_to_save "
                                  "value or trainable token rows; DoRA magnitudes and biases cannot be imported")
    incomplete = sorted(n for n, d in factors.items() if len(d) != 2)
    if incomplete or not factors:
        raise CheckpointError(f"{str(src)!r}: modules without both lora_A and lora_B: {incomplete[:5]}")
    state_dict, values, names, params = {}, {}, [], []
    for key, d in factors.items():
        lname, layer, pattern_key = _resolve(model, modules, key, conf, src)
        kind = kind_of(layer)
        if d["A"].ndim < 2 or d["B"].ndim < 2:
            raise CheckpointError(f"{str(src)!r}: {key!r} has lora_A of shape {tuple(d['A'].shape)} and lora_B of "
                                  f"shape {tuple(d['B'].shape)}; LoRA factors have at least 2 dimensions. The file "
                                  "is damaged; re-save it with PEFT")
        try:
            A, B = from_peft(kind, layer, d["A"], d["B"])
        except (RuntimeError, ValueError) as e:  # a reshape the factors' sizes do not allow
            raise CheckpointError(f"{str(src)!r}: the factors of {key!r} (lora_A {tuple(d['A'].shape)}, lora_B "
                                  f"{tuple(d['B'].shape)}) do not fit that layer ({e}); the adapter was trained on "
                                  "another base model") from None
        state_dict[f"{lname}.lora_A"], state_dict[f"{lname}.lora_B"] = A, B
        layer_r, layer_alpha = A.shape[-2], _peft_alpha(conf, pattern_key)
        if layer_r != _peft_pattern(conf.get("rank_pattern"), pattern_key, conf["r"]):
            raise CheckpointError(f"{str(src)!r}: {key!r} has rank {layer_r} but its config gives that layer "
                                  f"r={_peft_pattern(conf.get('rank_pattern'), pattern_key, conf['r'])}")
        own = {"r": layer_r, "alpha": layer_alpha}  # use_rslora stays the option: s = alpha / √r on each layer
        values[lname] = {k: v for k, v in own.items() if v != {"r": r, "alpha": alpha}[k]}
        (params if kind == "experts" else names).append((lname, pattern_key))
    exact = lambda n: f"^{re.escape(n)}$"  # noqa: E731
    info, extra_tensors = _extras_of(model, modules, saved, rows, src)
    cfg = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, exclude_names=(),
                     target_names=tuple(exact(n) for n, _ in sorted(names)) or ("^$",),
                     target_parameters=tuple(exact(p) for _, p in sorted(params)),
                     rank_pattern={exact(n): v["r"] for n, v in values.items() if "r" in v},
                     alpha_pattern={exact(n): v["alpha"] for n, v in values.items() if "alpha" in v},
                     modules_to_save=tuple(exact(n) for n in info.get("modules_to_save", [])),
                     trainable_token_indices=() if rows is None else tuple(_token_ids(conf, src)))
    targets = sorted(n for n, _ in names + params)
    info["layers"] = {n: v for n, v in values.items() if v}
    return attach_entries(model, {name: (cfg, targets, state_dict | extra_tensors, info)}, source=str(src))


def _resolve(model, modules, key: str, conf: dict, src: Path):
    """(our layer name, layer, the name PEFT matches patterns against) for a PEFT module key."""
    base, depth = key, 0
    while base.endswith(".base_layer"):
        base, depth = base[: -len(".base_layer")], depth + 1
    module = modules.get(base)
    if module is not None and experts.is_experts_module(module):
        order = [p for p in experts.expert_parameter_names(module)
                 if peft_targeted(list(conf.get("target_parameters") or []), f"{base}.{p}")]
        if depth >= len(order):
            raise CheckpointError(f"{str(src)!r}: {key!r} does not match the expert parameters its config targets "
                                  f"({conf.get('target_parameters')})")
        pname = order[len(order) - 1 - depth]
        return f"{base}.{experts.HOLDER}.{pname}", experts.placeholder(module, pname), f"{base}.{pname}"
    if module is None or depth or kind_of(module) is None:
        raise ConversionError(f"{str(src)!r} adapts {key!r}, which is not a layer lora-lite adapts in this model; "
                              "load it onto the base model it was trained on")
    return base, module, base


def _peft_pattern(patterns: dict | None, key: str, default):
    """PEFT's get_pattern_key rule: the first pattern that matches a dotted suffix of the key, else the default."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _peft_alpha(conf: dict, key: str) -> float:
    return float(_peft_pattern(conf.get("alpha_pattern"), key, conf["lora_alpha"]))


def _saved_owner(rest: str, modules: dict, conf: dict) -> str | None:
    """The modules_to_save module a `<module>.<parameter>` key belongs to (PEFT's suffix match), if any."""
    wanted = conf.get("modules_to_save") or []
    for mname, module in modules.items():
        if mname and rest.startswith(mname + ".") and any(mname.endswith(t) for t in wanted):
            if rest[len(mname) + 1:] in extras.own_parameters(module):
                return mname
    return None


def _embedding_weight(rest: str, modules: dict) -> torch.Tensor | None:
    """The model's weight a `<embedding>[.base_layer].weight` key names, for an embedding (or a tied head)."""
    mname = rest.removesuffix(".weight").removesuffix(".base_layer")
    module = modules.get(mname)
    if rest.endswith(".weight") and isinstance(module, nn.Embedding | nn.Linear):
        return module.weight
    return None


def _token_ids(conf: dict, src: Path) -> list[int]:
    ids = conf.get("trainable_token_indices")
    if isinstance(ids, dict):
        if len(ids) != 1:
            raise ConversionError(f"{str(src)!r} trains token rows of {sorted(ids)}; lora-lite trains rows of the "
                                  "input embedding only")
        (ids,) = ids.values()
    if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        raise CheckpointError(f"{str(src)!r} has trainable_token_indices={ids!r}; expected a list of token ids")
    return ids


def _extras_of(model, modules, saved, rows, src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    info, tensors = {}, {}
    if saved:
        info["modules_to_save"] = sorted(saved)
        tensors |= {f"{m}.{extras.SAVED}.{p}": t for m, params in saved.items() for p, t in params.items()}
    if rows is not None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        emb_name = next((n for n, m in modules.items() if m is emb), None)
        if emb_name is None or not (emb_name == rows[0] or emb_name.endswith("." + rows[0]) or rows[0].endswith(emb_name)):
            raise ConversionError(f"{str(src)!r} trains token rows of {rows[0]!r}, which is not this model's input "
                                  "embedding; lora-lite trains rows of the input embedding only")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = head is not None and getattr(head, "weight", None) is emb.weight
        info["token_rows"] = {"embedding": emb_name,
                              "tied_head": next(n for n, m in modules.items() if m is head) if tied else None}
        tensors[f"{emb_name}.{extras.TOKENS}.rows"] = rows[1]
    return info, tensors


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


def _check_config(conf: dict, src: Path) -> tuple[int, float, bool]:
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
        if key not in _HARMLESS | _READ and value not in (None, False, "none", [], {}):
            raise ConversionError(f"{str(src)!r} sets {key}={short_repr(value)}, which changes the LoRA forward in a "
                                  "way lora-lite's lora variant does not reproduce; only plain LoRA (bias='none', no "
                                  "DoRA, no layer replication) can be imported")
    _check_read_fields(conf, src)
    rslora = conf.get("use_rslora", False)
    rslora = False if rslora is None else rslora  # null in hand-written configs means off
    try:
        r = check_field(LoRAConfig, "r", conf.get("r"))
        alpha = check_field(LoRAConfig, "alpha", conf.get("lora_alpha"))
        if not isinstance(rslora, bool) or r < 1:
            raise ConfigError("expected r >= 1 and use_rslora true or false")
        return r, alpha, rslora  # rsLoRA stays the option (s = alpha/√r), not folded into alpha
    except ConfigError as e:
        raise CheckpointError(f"{str(src)!r} has r={short_repr(conf.get('r'))}, lora_alpha="
                              f"{short_repr(conf.get('lora_alpha'))}, use_rslora={short_repr(rslora)}: {e}") from None


def _check_read_fields(conf: dict, src: Path) -> None:
    """The fields import_peft reads (_READ) must have PEFT's types before any of them is used."""
    def is_number(v, integral=False):
        kinds = (int,) if integral else (int, float)
        return isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v)

    def names(v):
        return isinstance(v, list) and all(isinstance(x, str) and x for x in v)

    expected = {
        "rank_pattern": ("an object of {pattern: rank}", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and is_number(x, integral=True) and x >= 1 for k, x in v.items())),
        "alpha_pattern": ("an object of {pattern: alpha}", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and is_number(x) for k, x in v.items())),
        "modules_to_save": ("a list of module names", names),
        "target_parameters": ("a list of parameter names", names),
        "trainable_token_indices": ("a list of token ids (or {embedding: ids})", lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) for k in v) and all(
                isinstance(x, list) and all(is_number(i, integral=True) for i in x) for x in v.values()))
            or (isinstance(v, list) and all(is_number(i, integral=True) for i in v))),
    }
    for key, (what, ok) in expected.items():
        value = conf.get(key)
        if value is not None and not ok(value):
            raise CheckpointError(f"{str(src)!r} has {key}={short_repr(value)}; PEFT writes {what} there. The "
                                  f"{CONFIG_FILE} is damaged or hand-edited; re-save the adapter with PEFT")

