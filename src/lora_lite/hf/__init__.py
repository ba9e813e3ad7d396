"""Hugging Face training stacks: transformers' Trainer, TRL, save_pretrained-style adapter directories.

    import lora_lite.hf                          # needs the `hf` extra (transformers); `import lora_lite` does not
    ll.hf.save_pretrained(model, "out")          # out/adapter.safetensors: the adapter, never the base
    model = ll.hf.from_pretrained(base_id, "out")
    trainer = ll.hf.Trainer(model=model, ...)    # checkpoints hold the adapter only; resume onto a fresh base
    class SFT(ll.hf.AdapterCheckpoints, trl.SFTTrainer): ...
    class DPO(ll.hf.BaseAsReference, ll.hf.AdapterCheckpoints, trl.DPOTrainer): ...   # reference = ll.disabled

Recipes, and what each is tested by: docs/training.md.
"""

from .pretrained import ADAPTER_FILE, from_pretrained, save_pretrained
from .reference import BaseAsReference
from .trainer import AdapterCheckpoints, Trainer

__all__ = ["ADAPTER_FILE", "save_pretrained", "from_pretrained", "AdapterCheckpoints", "Trainer", "BaseAsReference"]
