"""transformers' Trainer with lora_lite.hf.Trainer: adapter-only checkpoints, exact resume onto a fresh base,
save_model, load_best_model_at_end; and the refusal a plain Trainer now meets.

The model is the real pretrained stories260K Llama; the data is GSM8K questions through its tokenizer."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from safetensors import safe_open

import lora_lite as ll
import lora_lite.hf as llhf
from conftest import fresh_model
from families import BY_NAME
from lora_lite.hf.pretrained import restore
from variant_cases import CASES, attach_case, gsm8k_batches

METHODS = sorted(ll.REGISTRY)
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@functools.cache
def dataset() -> list[dict[str, torch.Tensor]]:
    rows = []
    for b in gsm8k_batches(fresh_model("stories"), n_batches=4, batch_size=4, max_length=24):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        rows += [{"input_ids": i, "attention_mask": m, "labels": y}
                 for i, m, y in zip(b["input_ids"], b["attention_mask"], labels, strict=True)]
    return rows


def arguments(out, lr=1e-2, max_steps=4, **kw) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4, learning_rate=lr,
        logging_steps=1, seed=0, report_to=[], use_cpu=True, disable_tqdm=True, **kw)


def adapted(name: str, seed: int = 0):
    model = fresh_model("stories")
    torch.manual_seed(seed)
    attach_case(model, name, "stories")
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def train(model, out, name, resume=None, trainer_class=llhf.Trainer, **kw):
    trainer = trainer_class(model=model, args=arguments(out, lr=CASES[name].lr, **kw), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", METHODS)
def test_resume_on_a_fresh_base_ends_bit_identical(name, tmp_path):
    whole = adapted(name)
    reference = train(whole, tmp_path / "whole", name)
    expected, expected_state = lora_state(whole), whole.state_dict()

    bare = fresh_model("stories")  # no adapter: the checkpoint's is attached
    resumed = train(bare, tmp_path / "bare", name, resume=str(tmp_path / "whole" / "checkpoint-2"))
    reattached = adapted(name, seed=1)  # the training script attached a (differently seeded) adapter again
    train(reattached, tmp_path / "again", name, resume=str(tmp_path / "whole" / "checkpoint-2"))

    for model in (bare, reattached):
        got = lora_state(model)
        assert got.keys() == expected.keys()
        assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
        state = model.state_dict()  # base weights too: W_res of weight-rewriting methods included
        assert [k for k in expected_state if not torch.equal(state[k], expected_state[k])] == []
    assert losses(resumed) == losses(reference)  # steps 1-2 read back from trainer_state.json, 3-4 recomputed


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_checkpoints_hold_the_adapter_and_trainer_state_only(name, tmp_path):
    model = adapted(name)
    train(model, tmp_path, name)
    checkpoint = tmp_path / "checkpoint-2"
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    assert set(sizes) == {llhf.ADAPTER_FILE} | TRAINER_FILES
    adapter_bytes = ll.save(model, tmp_path / "alone.safetensors").stat().st_size
    base_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if "lora_" not in k)
    print(f"MEASURED checkpoint {name}: {sizes}, base {base_bytes}")
    assert sizes[llhf.ADAPTER_FILE] == adapter_bytes
    moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"].values()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(tuple(m["exp_avg"].shape) for m in moments) == sorted(tuple(p.shape) for p in trainable)
    assert sum(sizes[f] for f in TRAINER_FILES - {"optimizer.pt"}) <= 32_000
    assert sum(sizes.values()) < base_bytes / 2


def test_save_model_writes_the_adapter_that_from_pretrained_rebuilds(tmp_path):
    model = adapted("lora")
    trainer = train(model, tmp_path / "run", "lora", max_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    assert llhf.ADAPTER_FILE in {p.name for p in (tmp_path / "final").iterdir()}
    base_dir = tmp_path / "base"
    fresh_model("stories").save_pretrained(base_dir)
    rebuilt = llhf.from_pretrained(base_dir, tmp_path / "final")
    assert all(torch.equal(v, lora_state(rebuilt)[k]) for k, v in lora_state(model).items())


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = adapted("lora")
    # "best" = highest eval loss, so the first checkpoint wins and the restored adapter differs from the last
    trainer = train(model, tmp_path, "lora", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=True, trainer_class=_WithEval)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = fresh_model("stories")
    ll.load(best, tmp_path / "checkpoint-2" / llhf.ADAPTER_FILE)
    last = fresh_model("stories")
    ll.load(last, tmp_path / "checkpoint-4" / llhf.ADAPTER_FILE)
    assert all(torch.equal(v, lora_state(best)[k]) for k, v in lora_state(model).items())
    assert not all(torch.equal(v, lora_state(last)[k]) for k, v in lora_state(model).items())


class _WithEval(llhf.Trainer):
    def __init__(self, **kw):
        super().__init__(eval_dataset=dataset()[:4], **kw)


def test_a_plain_trainer_is_refused_at_its_first_checkpoint(tmp_path):
    with pytest.raises(ll.AttachStateError, match=r"lora_lite\.hf\.Trainer"):
        train(adapted("pissa"), tmp_path, "pissa", trainer_class=transformers.Trainer)
    assert not list(tmp_path.glob("checkpoint-*/model.safetensors"))


def test_resume_refuses_a_different_adapter_and_a_whole_model_checkpoint(tmp_path):
    train(adapted("lora"), tmp_path / "run", "lora", max_steps=2)
    other = fresh_model("stories")
    ll.attach(other, ll.LoRAConfig(r=2))
    with pytest.raises(ll.CheckpointError, match="attach the same config"):
        train(other, tmp_path / "other", "lora", resume=str(tmp_path / "run" / "checkpoint-2"))
    whole = tmp_path / "whole" / "checkpoint-2"
    fresh_model("stories").save_pretrained(whole)
    with pytest.raises(ll.CheckpointError, match="whole-model weights"):
        train(fresh_model("stories"), tmp_path / "whole", "lora", resume=str(whole))


def test_resume_refuses_an_adapter_whose_data_came_from_another_base(tmp_path):
    """PiSSA's factors are the base's singular vectors: written into an adapter attached to other weights, they would
    train silently wrong. The base fingerprints saved with the checkpoint refuse it, as load does."""
    train(adapted("pissa"), tmp_path / "run", "pissa", max_steps=2)
    other = fresh_model("stories")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    attach_case(other, "pissa", "stories")
    with pytest.raises(ll.CheckpointError, match="saved from another base model"):
        train(other, tmp_path / "other", "pissa", resume=str(tmp_path / "run" / "checkpoint-2"))


def test_training_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(ll.AttachStateError, match="carries no lora-lite adapter"):
        train(fresh_model("stories"), tmp_path, "lora")


# --- modules trained whole and token rows (lora_lite.extras) in Trainer checkpoints ----------------------------


def classification_rows(n=16, seq=8, seed=0) -> list[dict[str, torch.Tensor]]:
    """A learnable toy task for the tiny BERT classifier: label 1 when token 7 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 64, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, torch.randint(0, seq, (int(labels.sum()),), generator=g)] = 7
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels, strict=True)]


def classifier(seed: int = 0):
    """The tiny BERT classifier (dropout on) with LoRA, its head trained whole and rows 7 and 9 of its embedding."""
    model = BY_NAME["bert_seq_cls"].build().train()
    torch.manual_seed(seed)
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8, modules_to_save=(r"^classifier$",), trainable_token_indices=(7, 9)))
    return model


def train_classifier(model, out, resume=None, max_steps=4):
    trainer = llhf.Trainer(model=model, args=arguments(out, lr=5e-3, max_steps=max_steps),
                           train_dataset=classification_rows())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_restores_the_head_trained_whole_and_the_token_rows_exactly(tmp_path):
    base = BY_NAME["bert_seq_cls"].build()
    whole = classifier()
    reference = train_classifier(whole, tmp_path / "whole")
    rows = whole.bert.embeddings.word_embeddings.lora_tokens["default"].rows
    assert not torch.equal(whole.classifier.weight, base.classifier.weight)
    assert not torch.equal(rows, base.bert.embeddings.word_embeddings.weight[[7, 9]])
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    with safe_open(str(checkpoint / llhf.ADAPTER_FILE), "pt") as f:
        assert {"classifier.lora_saved.default.weight", "classifier.lora_saved.default.bias",
                "bert.embeddings.word_embeddings.lora_tokens.default.rows"} <= set(f.keys())
    moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"].values()
    trainable = [p for p in whole.parameters() if p.requires_grad]
    assert sorted(tuple(m["exp_avg"].shape) for m in moments) == sorted(tuple(p.shape) for p in trainable)
    expected = whole.state_dict()

    bare = BY_NAME["bert_seq_cls"].build()  # no adapter: the checkpoint's (head and rows included) is attached
    resumed = train_classifier(bare, tmp_path / "bare", resume=str(checkpoint))
    reattached = classifier(seed=1)  # attached again by the script: head and rows are overwritten in place
    params_before = [id(p) for p in reattached.parameters()]
    train_classifier(reattached, tmp_path / "again", resume=str(checkpoint))
    assert [id(p) for p in reattached.parameters()] == params_before
    for model in (bare, reattached):
        state = model.state_dict()  # the classifier's own weights, the rows, the LoRA tensors, the frozen base
        assert state.keys() == expected.keys()
        assert [k for k in expected if not torch.equal(state[k], expected[k])] == []
    assert losses(resumed) == losses(reference)

    # restored while switched off: the trained head goes to the stash, the original head stays in place until on
    off = classifier(seed=2)
    with ll.disabled(off):
        restore(off, tmp_path / "whole" / "checkpoint-4" / llhf.ADAPTER_FILE)
        assert torch.equal(off.classifier.weight, base.classifier.weight)
    assert [k for k in expected if not torch.equal(off.state_dict()[k], expected[k])] == []


def test_save_model_of_a_classifier_rebuilds_through_from_pretrained(tmp_path):
    model = classifier()
    trainer = train_classifier(model, tmp_path / "run", max_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    base_dir = tmp_path / "base"
    BY_NAME["bert_seq_cls"].build().save_pretrained(base_dir)
    rebuilt = llhf.from_pretrained(base_dir, tmp_path / "final", model_class=transformers.BertForSequenceClassification)
    batch = {k: torch.stack([r[k] for r in classification_rows()[:4]]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(**batch).logits, model.eval()(**batch).logits)


def test_resume_refuses_a_model_whose_head_is_not_trained_whole(tmp_path):
    train_classifier(classifier(), tmp_path / "run", max_steps=2)
    other = BY_NAME["bert_seq_cls"].build()
    ll.attach(other, ll.LoRAConfig(r=4, alpha=8, trainable_token_indices=(7, 9)))
    with pytest.raises(ll.CheckpointError, match="attach the same config"):
        train_classifier(other, tmp_path / "other", resume=str(tmp_path / "run" / "checkpoint-2"))
