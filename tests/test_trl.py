"""TRL with a lora-lite model: SFTTrainer (activation checkpointing off, non-reentrant, reentrant) and DPOTrainer
with the base as reference through lora_lite.disabled, against a DPO run with an explicit frozen copy.

The model is the real pretrained stories260K Llama with its tokenizer; the text is GSM8K. A few steps each."""

from __future__ import annotations

import copy

import pytest
import torch
import trl
from datasets import Dataset

import lora_lite as ll
import lora_lite.hf as llhf
from conftest import fresh_model, gsm8k_rows, stories_tokenizer

MODES = {"off": None, "non-reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


class SFT(llhf.AdapterCheckpoints, trl.SFTTrainer):
    pass


class DPO(llhf.BaseAsReference, llhf.AdapterCheckpoints, trl.DPOTrainer):
    pass


class DPOWithReferenceModel(llhf.AdapterCheckpoints, trl.DPOTrainer):
    pass


def common(out) -> dict:
    return dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                seed=0, report_to=[], use_cpu=True, disable_tqdm=True, max_length=64, save_strategy="no")


def adapted(name="lora"):
    model = fresh_model("stories")
    torch.manual_seed(0)
    ll.attach(model, ll.REGISTRY[name].config(r=4))
    return model


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def sft_data() -> Dataset:
    rows = gsm8k_rows("train", 8)
    return Dataset.from_list([{"prompt": r["question"][:120], "completion": " " + r["answer"][:60]} for r in rows])


def dpo_data() -> Dataset:
    rows = gsm8k_rows("train", 8)
    return Dataset.from_list([{"prompt": r["question"][:80], "chosen": " " + r["answer"][:40],
                               "rejected": " " + rows[(i + 1) % len(rows)]["answer"][:40]}
                              for i, r in enumerate(rows)])


def test_sft_trains_the_same_with_and_without_activation_checkpointing(tmp_path):
    runs = {}
    for mode, kwargs in MODES.items():
        model = adapted()
        base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        args = trl.SFTConfig(**{**common(tmp_path / mode), "save_strategy": "steps", "save_steps": 3},
                             gradient_checkpointing=kwargs is not None, gradient_checkpointing_kwargs=kwargs)
        trainer = SFT(model=model, args=args, train_dataset=sft_data(), processing_class=stories_tokenizer())
        trainer.train()
        assert model.model.layers[0].gradient_checkpointing == (kwargs is not None)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
        saved = {p.name for p in (tmp_path / mode / "checkpoint-3").iterdir()}
        assert llhf.ADAPTER_FILE in saved and not any(n.startswith("model") for n in saved), saved
        runs[mode] = (losses(trainer), lora_state(model))
        if mode == "off":
            trainer.save_model(str(tmp_path / "final"))
    plain_losses, plain_state = runs["off"]
    assert len(plain_losses) == 3 and plain_losses[-1] < plain_losses[0]
    for mode, (mode_losses, state) in runs.items():
        assert mode_losses == plain_losses, mode
        assert all(torch.equal(state[k], plain_state[k]) for k in plain_state), mode
    reloaded = fresh_model("stories")
    ll.load(reloaded, tmp_path / "final" / llhf.ADAPTER_FILE)
    assert all(torch.equal(v, plain_state[k]) for k, v in lora_state(reloaded).items())


@pytest.mark.parametrize("name", ["lora", "pissa"])  # a hook-only method and one that rewrites W
def test_dpo_with_the_base_through_disabled_equals_dpo_with_a_frozen_copy(name, tmp_path):
    frozen = fresh_model("stories")  # a second model in memory: what BaseAsReference avoids
    policy = adapted(name)
    explicit = DPOWithReferenceModel(model=policy, ref_model=frozen, args=trl.DPOConfig(**common(tmp_path / "copy")),
                                     train_dataset=dpo_data(), processing_class=stories_tokenizer())
    explicit.train()

    ours_model = adapted(name)
    args = trl.DPOConfig(**common(tmp_path / "ours"), precompute_ref_log_probs=True)
    ours = DPO(model=ours_model, args=args, train_dataset=dpo_data(), processing_class=stories_tokenizer())
    assert ours.ref_model is None
    ours.train()
    assert len(losses(ours)) == 3 and losses(ours) == losses(explicit)
    expected = lora_state(policy)
    assert all(torch.equal(v, expected[k]) for k, v in lora_state(ours_model).items())


def test_base_as_reference_refuses_what_would_load_a_second_model(tmp_path):
    model = adapted()
    data, tok = dpo_data(), stories_tokenizer()
    with pytest.raises(ll.ConfigError, match="precompute_ref_log_probs=True"):
        DPO(model=model, args=trl.DPOConfig(**common(tmp_path)), train_dataset=data, processing_class=tok)
    with pytest.raises(ll.ConfigError, match="drop ref_model"):
        DPO(model=model, ref_model=copy.deepcopy(model),
            args=trl.DPOConfig(**common(tmp_path), precompute_ref_log_probs=True), train_dataset=data,
            processing_class=tok)
