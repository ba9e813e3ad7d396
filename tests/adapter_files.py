"""Build adapter files by hand (valid ones from lora_lite.save, then taken apart and put back together)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import lora_lite as ll
from conftest import fresh_model

SMALL = dict(r=2, target_names=(r"q_proj$", r"v_proj$"))  # 4 layers, 8 tensors


def saved_adapter(cfg=None, model=None) -> bytes:
    """Bytes of a real adapter file, with non-zero trained-looking values."""
    model = fresh_model("qwen") if model is None else model
    ll.attach(model, cfg or ll.LoRAConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        path = ll.save(model, Path(d) / "a.safetensors")
        blob = path.read_bytes()
    ll.detach(model)
    return blob


def split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def with_metadata(blob: bytes, **changes) -> bytes:
    """Replace metadata entries (None deletes one); values that are not strings are JSON-encoded."""
    header, data = split(blob)
    meta = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    return join(header, data)


def adapters_meta(blob: bytes) -> dict:
    return json.loads(split(blob)[0]["__metadata__"]["adapters"])


def with_config(blob: bytes, adapter: str = "default", **fields) -> bytes:
    """Replace fields of one adapter's JSON config in the metadata (a value of ... deletes the field)."""
    adapters = adapters_meta(blob)
    config = adapters[adapter]["config"]
    for key, value in fields.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return with_metadata(blob, adapters=json.dumps(adapters))


def with_targets(blob: bytes, targets, adapter: str = "default") -> bytes:
    adapters = adapters_meta(blob)
    adapters[adapter]["targets"] = targets
    return with_metadata(blob, adapters=json.dumps(adapters))
