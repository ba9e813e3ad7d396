"""Adapter directories, save_pretrained-style: the adapter alone, never the base.

    ll.hf.save_pretrained(model, "out")                       # out/adapter.safetensors, configs in its metadata
    model = ll.hf.from_pretrained("Qwen/Qwen3-0.6B-Base", "out", dtype=torch.bfloat16)   # base + adapter, one call

The directory holds one lora-lite adapter file (format v2, lora_lite.io), so it is a few KB to MB where the
model's own save_pretrained would write every base tensor. Trainer checkpoints written through
lora_lite.hf.AdapterCheckpoints are such directories too (plus the trainer's own state files).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .. import extras, validate
from ..distributed import unwrap
from ..errors import CheckpointError, ConfigError
from ..io import layer_values, load, read_adapter_file, save
from ..runtime import adapter_layers, adapters_by_name, set_activity, variant_of

ADAPTER_FILE = "adapter.safetensors"


def save_pretrained(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write the model's adapters (None: all; else just `name`) to `directory/adapter.safetensors`, atomically.
    Returns the file's path."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"save_pretrained() needs a directory, but {str(directory)!r} is a file; pass a "
                              "directory path, or use lora_lite.save(model, path) for a single file")
    return save(unwrap(model), directory / ADAPTER_FILE, name=name)


def adapter_file(directory: str | os.PathLike) -> Path:
    """`directory/adapter.safetensors`, or a CheckpointError that says what the directory holds instead."""
    directory = Path(directory)
    path = directory / ADAPTER_FILE
    if path.is_file():
        return path
    if not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is not a directory; pass the directory that "
                              "lora_lite.hf.save_pretrained or a lora_lite.hf Trainer checkpoint wrote")
    present = sorted(p.name for p in directory.iterdir())
    if "adapter_model.safetensors" in present:
        hint = "it is a PEFT adapter: attach it with lora_lite.import_peft(model, directory)"
    elif any(n.startswith("model") and n.endswith(".safetensors") for n in present):
        hint = ("it holds whole-model weights (transformers' save_pretrained, or a Trainer without "
                "lora_lite.hf.AdapterCheckpoints), which carry no lora-lite config")
    else:
        hint = f"it holds {present[:8]}"
    raise CheckpointError(f"{str(directory)!r} has no {ADAPTER_FILE}; {hint}. Adapter directories are written by "
                          "lora_lite.hf.save_pretrained(model, directory)")


def from_pretrained(base: str | os.PathLike, adapter_dir: str | os.PathLike, *, name: str | None = None,
                    model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """The adapted model in one call: `model_class.from_pretrained(base, **from_pretrained_kwargs)` (default
    AutoModelForCausalLM; e.g. dtype=, device_map=) with the adapters of `adapter_dir` loaded (name: just that one).
    The adapter's tensors are trainable, as after attach."""
    if not isinstance(base, (str, os.PathLike)):
        raise ConfigError(f"from_pretrained() takes the base model's hub id or local path, got a "
                          f"{type(base).__name__}; for a model you already built, use "
                          f"lora_lite.load(model, {str(Path(adapter_dir) / ADAPTER_FILE)!r})")
    path = adapter_file(adapter_dir)  # checked before the (possibly large) base is loaded
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(base, **from_pretrained_kwargs)
    load(model, path, name=name)
    return model


def restore(model: nn.Module, path: str | os.PathLike) -> None:
    """Give `model` the adapters stored at `path`, exactly: attached by load() if it carries none, else written into
    the adapters it already carries (same names, configs, layers, per-layer r / alpha, modules trained whole and
    token rows), which keeps every Parameter object, so an optimizer or a DDP wrapper built on them stays valid.
    Used for resume_from_checkpoint and load_best_model_at_end."""
    model = unwrap(model)
    groups = adapters_by_name(model)
    if not groups:
        load(model, path)
        return
    entries = read_adapter_file(path)
    if set(entries) != set(groups):
        raise CheckpointError(f"{str(path)!r} holds adapters {sorted(entries)} but the model carries {sorted(groups)}; "
                              "build the model with the same adapters, or with none (the file's are then attached)")
    plan = []
    for n, (cfg, targets, tensors, info) in entries.items():
        layers = adapter_layers(model, n)
        attached = groups[n][0].attached_cfg
        if cfg != attached or set(targets) != set(layers):
            raise CheckpointError(f"adapter {n!r} in {str(path)!r} has config {cfg.to_dict()} on {len(targets)} layers, "
                                  f"the model's has {attached.to_dict()} on {len(layers)}; attach the same "
                                  "config, or build the model without an adapter (the file's is then attached)")
        _check_same_layout(model, n, layers, info, path)
        validate.check_fingerprints(variant_of(cfg), n, [(lname, a.base, None) for lname, a in layers.items()],
                                    info.get("base_fingerprint"), path)  # as load: data derived from another base
        specs = {f"{lname}.{t}": (getattr(a, t).dtype, tuple(getattr(a, t).shape))
                 for lname, a in layers.items() for t in a.tensor_names} | extras.value_specs(model, n)
        if set(specs) != set(tensors):
            raise CheckpointError(f"adapter {n!r} in {str(path)!r} holds tensors {sorted(set(tensors) - set(specs))[:4]} "
                                  f"the model's lacks and lacks {sorted(set(specs) - set(tensors))[:4]}; attach the "
                                  "same config, or build the model without an adapter (the file's is then attached)")
        for key, (dtype, shape) in specs.items():
            stored = tensors[key]
            if (stored.dtype, tuple(stored.shape)) != (dtype, shape):
                raise CheckpointError(f"{key} is {stored.dtype}{tuple(stored.shape)} in {str(path)!r} but "
                                      f"{dtype}{shape} on the model; it was saved from another base model or dtype")
        plan.append((n, layers, tensors))
    with torch.no_grad():
        for n, layers, tensors in plan:
            for lname, a in layers.items():
                was_active = a.active
                set_activity(a, False)  # a weight-rewriting method puts the original W back first
                for t in a.tensor_names:
                    getattr(a, t).copy_(tensors[f"{lname}.{t}"])
                set_activity(a, was_active)  # ... and W_res is rebuilt from the restored tensors
            extras.write_values(model, n, tensors)  # modules_to_save and token rows, in place


def _check_same_layout(model: nn.Module, name: str, layers: dict, info: dict, path) -> None:
    """The file's per-layer r / alpha (rank_pattern, alpha_pattern), modules trained whole and token rows are the
    model's: a config with the same patterns could still resolve them to other layers on another model."""
    mine = {"layers": {lname: v for lname, a in layers.items() if (v := layer_values(a))}}
    mine |= extras.describe(model, name).metadata()
    theirs = {k: info[k] for k in ("layers", "modules_to_save", "token_rows") if k in info}
    mine = {k: v for k, v in mine.items() if v}
    if mine != theirs:
        raise CheckpointError(f"adapter {name!r} in {str(path)!r} records {theirs or 'no per-layer values or extras'}, "
                              f"the model's has {mine or 'none'}; attach the same config to the same base model, or "
                              "build the model without an adapter (the file's is then attached)")
