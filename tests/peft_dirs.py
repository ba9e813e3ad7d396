"""PEFT LoRA directories written by PEFT itself, and small edits of them, for the import_peft tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import fresh_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_lora_dir(path: Path, **lora_kwargs) -> Path:
    """A PEFT LoRA (r=4, q/v) on the tiny Qwen with random nonzero B, saved by PEFT's save_pretrained."""
    import peft

    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora_kwargs}
    model = peft.get_peft_model(fresh_model("qwen"), peft.LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path))
    return path


def edit_config(peft_dir: Path, **fields) -> None:
    conf = json.loads((peft_dir / CONFIG).read_text())
    conf.update(fields)
    (peft_dir / CONFIG).write_text(json.dumps(conf))


def edit_weights(peft_dir: Path, edit) -> None:
    """Rewrite the weights file after `edit(tensors)` changed the dict in place."""
    tensors = load_file(str(peft_dir / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(peft_dir / WEIGHTS), metadata={"format": "pt"})
