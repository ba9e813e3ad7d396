"""PEFT interop: export an adapter as a plain PEFT LoRA directory, import a PEFT LoRA directory as ours.

The directory is what PEFT's save_pretrained writes and what PeftModel.from_pretrained and vLLM read:
    adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, bias "none", ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r)
PEFT adds lora_alpha / r · B A to the *original* base weight.

export_peft works for every variant with `lora_factors(layer) -> (A, B, scale)`, the exact low-rank form of
W_merged − W_original: LoRA and DeLoRA at rank r, PiSSA at rank 2r ([B, −B0], [A; A0], alpha doubled, as
PEFT converts it), HRA at rank r (A = Y, B = −W Yᵀ T). Variants whose change is full rank (DoRA, IA3,
IA3-FF, RoAd) are refused; merge() them instead. Factors are written in fp32.

import_peft reads a LoRA directory into our `lora` variant with the same r, lora_alpha and use_rslora. Targets
come from the tensor keys, so PEFT's target_modules/layers_to_transform rules never need re-implementing. Config
fields that change the math (use_dora, bias, rank/alpha patterns, modules_to_save, ...) are refused, as are
adapters that expect a rewritten base (PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA saved without conversion). Tensors are
upcast to fp32, like PEFT's default autocast_adapter_dtype=True.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import CheckpointError, ConversionError
from .io import atomic_write_bytes, attach_entries
from .runtime import adapter_config, adapter_layers, resolve_name
from .validate import check_finite
from .variants.lora import LoRAConfig

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Fields that do not change the forward of a trained LoRA (targets are taken from the tensor keys instead).
_HARMLESS = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
             "layers_to_transform", "layers_pattern", "lora_dropout", "init_lora_weights", "loftq_config",
             "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
             "runtime_config", "ensure_weight_tying"}
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


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
    atomic_write_bytes(out / WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _target_modules(model, names):
    """Leaf names (["q_proj", "v_proj"]) when PEFT's suffix match selects exactly our layers, else full paths."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    selected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(names) else sorted(names)


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str = "default") -> list[str]:
    """Attach the PEFT LoRA in `peft_dir` to `model` as a lora-lite `lora` adapter named `name`."""
    src = Path(peft_dir)
    if not (src / CONFIG_FILE).is_file() or not (src / WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in src.iterdir()) if src.is_dir() else "no such directory"
        raise CheckpointError(f"{str(src)!r} must hold {CONFIG_FILE} and {WEIGHTS_FILE} (found: {found}). "
                              "A .bin checkpoint is pickle: re-save it with safe_serialization=True")
    try:
        conf = json.loads((src / CONFIG_FILE).read_text())
        tensors = load_file(str(src / WEIGHTS_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{str(src)!r} is not a readable PEFT adapter ({e})") from None
    r, alpha, rslora = _check_config(conf, src)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ConversionError(f"{str(src)!r} holds {key!r}, which is not a LoRA A/B weight; embedding LoRA, "
                                  "DoRA magnitudes, biases and modules_to_save cannot be imported")
        # a copy, never a view of the file's memory map; 16-bit upcast like PEFT's autocast_adapter_dtype
        t = t.to(torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype, copy=True)
        per_module.setdefault(m.group(1), {})[f"lora_{m.group(2)}"] = t
    incomplete = sorted(n for n, d in per_module.items() if len(d) != 2)
    if incomplete or not per_module:
        raise CheckpointError(f"{str(src)!r}: modules without both lora_A and lora_B: {incomplete[:5]}")
    check_finite(tensors, src)
    names = sorted(per_module)
    cfg = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, target_names=tuple(f"^{re.escape(n)}$" for n in names))
    state_dict = {f"{n}.{k}": t for n, d in per_module.items() for k, t in d.items()}
    return attach_entries(model, {name: (cfg, names, state_dict)}, source=str(src))


def _check_config(conf: dict, src: Path) -> tuple[int, float, bool]:
    if conf.get("peft_type") != "LORA":
        raise ConversionError(f"{str(src)!r} is a PEFT {conf.get('peft_type')!r} adapter; only LORA can be imported")
    init = conf.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise ConversionError(f"{str(src)!r} was saved with init_lora_weights={init!r}, so it expects PEFT's "
                              "rewritten residual base. Re-save it in PEFT with path_initial_model_for_weight_conversion")
    for key, value in conf.items():
        if key not in _HARMLESS and value not in (None, False, "none", [], {}):
            raise ConversionError(f"{str(src)!r} sets {key}={value!r}, which changes the LoRA forward in a way "
                                  "lora-lite's lora variant does not reproduce; only plain LoRA (bias='none', no "
                                  "DoRA, no rank/alpha patterns, no modules_to_save) can be imported")
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    rslora = conf.get("use_rslora") or False  # null in hand-written configs means off
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or not isinstance(rslora, bool):
        raise CheckpointError(f"{str(src)!r} has r={r!r}, lora_alpha={alpha!r}, use_rslora={rslora!r}; expected a "
                              "positive int, a number and a bool")
    return r, float(alpha), rslora
