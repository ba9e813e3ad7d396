"""transformers' Trainer with adapter-only checkpoints.

    trainer = ll.hf.Trainer(model=model, args=TrainingArguments(...), train_dataset=ds)      # model: adapted
    class SFT(ll.hf.AdapterCheckpoints, trl.SFTTrainer): ...                                 # any Trainer subclass

Trainer routes every model write through `_save` and every read through `_load_from_checkpoint` and
`_load_best_model`; the mixin overrides those three (the hooks PEFT's integration uses inside Trainer itself):
- checkpoint-N/ and save_model() hold `adapter.safetensors` (configs in its metadata) instead of the whole model,
  next to the trainer's own files (optimizer, scheduler, RNG state, trainer_state.json, training_args.bin);
- resume_from_checkpoint restores the adapter onto a freshly built base, either bare (the checkpoint's adapters are
  attached) or with the same adapters attached again by the training script (their values are overwritten in
  place), then Trainer restores optimizer, scheduler and RNG state as usual, so a resumed run continues exactly;
- load_best_model_at_end restores the best checkpoint's adapter in place.
Single process and DDP. FSDP and DeepSpeed gather their own state dicts in Trainer and are refused at
construction; see docs/distributed.md for those.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from ..distributed import unwrap
from ..errors import AttachStateError, ConfigError
from ..runtime import adapter_names
from .pretrained import adapter_file, restore, save_pretrained

TRAINING_ARGS_FILE = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


class AdapterCheckpoints:
    """Mixin for transformers.Trainer and its subclasses: checkpoints and save_model() write the adapter only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ConfigError("lora_lite.hf.AdapterCheckpoints supports single-process and DDP training; under FSDP "
                              "or DeepSpeed, train with the loop in docs/distributed.md (lora_lite.distributed.save "
                              "writes the adapter from every rank)")

    def create_optimizer(self, *args, **kwargs):
        # Runs after resume_from_checkpoint has restored the adapter: without one the whole base would train and
        # the first checkpoint would fail.
        if not adapter_names(unwrap(self.model)):
            raise AttachStateError("the model carries no lora-lite adapter: attach one before training "
                                   "(lora_lite.attach), or resume from a checkpoint of this trainer")
        return super().create_optimizer(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:  # only Trainer's FSDP / DeepSpeed / SageMaker paths gather one
            raise ConfigError("Trainer passed a gathered state dict (FSDP, DeepSpeed or SageMaker MP); "
                              "lora_lite.hf.AdapterCheckpoints saves from the model itself and supports single-process "
                              "and DDP training only")
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        save_pretrained(self.model, output_dir)
        tokenizer = self.processing_class  # as Trainer._save: the processing class, else the collator's tokenizer
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        restore(self.model if model is None else model, adapter_file(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        restore(self.model, adapter_file(self.state.best_model_checkpoint))


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """transformers.Trainer whose checkpoints and save_model() hold only the lora-lite adapter."""
