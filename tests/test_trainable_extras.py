"""Modules trained whole (modules_to_save) and trainable embedding rows (trainable_token_indices), lora_lite.extras.

The sequence-classification fine-tune of a tiny BERT is the issue's acceptance case: the classifier head trains
together with the LoRA, and the saved file reloads to exactly the trained model.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll
from families import BY_NAME
from lora_lite.io import read_adapter_file
from model_state import assert_unchanged, fingerprint

peft = pytest.importorskip("peft")


def sentiment_batch(n=16, seq=8, vocab=64, seed=0):
    """A learnable toy task: label 1 when token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, torch.randint(0, seq, (int(labels.sum()),), generator=g)] = 7
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_bert_sequence_classification_trains_head_and_lora_together_and_reloads_exactly(tmp_path):
    base = BY_NAME["bert_seq_cls"].build()
    model = copy.deepcopy(base)
    before = fingerprint(model)
    head_before = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8, modules_to_save=(r"^classifier$",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    assert not any("classifier" in n for n in ll.runtime.adapter_layers(model))  # trained whole, not adapted

    batch = sentiment_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(model.classifier.weight, head_before["weight"])
    assert all(a.lora_B.abs().max() > 0 for a in ll.runtime.adapter_layers(model).values())

    path = ll.save(model, tmp_path / "cls.safetensors")
    with safe_open(str(path), "pt") as f:
        assert {"classifier.lora_saved.default.weight", "classifier.lora_saved.default.bias"} <= set(f.keys())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        fresh = copy.deepcopy(base)
        ll.load(fresh, path)
        assert torch.equal(fresh(**inputs).logits, trained)
        assert torch.equal(fresh.classifier.weight, model.classifier.weight)
        with ll.disabled(fresh):  # the original head and no LoRA inside, the trained head after
            assert torch.equal(fresh(**inputs).logits, base(**inputs).logits)
        assert torch.equal(fresh(**inputs).logits, trained)
    ll.detach(model)
    assert_unchanged(model, before)


def test_a_head_trained_whole_survives_deepcopy_pickle_and_set_active(tmp_path):
    model = BY_NAME["bert_seq_cls"].build()
    inputs = {"input_ids": sentiment_batch(4)["input_ids"]}
    with torch.no_grad():
        base = model(**inputs).logits
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"query$",), modules_to_save=("classifier",)), name="a")
    ll.attach(model, ll.IA3Config(target_names=(r"value$",)), name="b")
    assert not model.classifier.weight.grad and model.classifier.weight.requires_grad  # b's attach left it trainable
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        ll.runtime.adapter_layers(model, "b")["bert.encoder.layer.0.attention.self.value"].lora_g.fill_(1.5)
        out = model(**inputs).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(**inputs).logits, out)
            ll.detach(clone)
            assert torch.equal(clone(**inputs).logits, base)
        ll.set_active(model, "b")
        only_b = model(**inputs).logits
        ll.set_active(model, ["a", "b"])
        assert torch.equal(model(**inputs).logits, out)
        ll.detach(model, "a")
        assert torch.equal(model(**inputs).logits, only_b)


def test_merge_keeps_the_trained_head():
    model = BY_NAME["bert_seq_cls"].build()
    inputs = {"input_ids": sentiment_batch(4)["input_ids"]}
    ll.attach(model, ll.LoRAConfig(r=2, modules_to_save=("classifier",)))
    with torch.no_grad():
        model.classifier.weight.add_(0.3)
        for a in ll.runtime.adapter_layers(model).values():
            a.lora_B.normal_(0, 0.05)
        hooked = model(**inputs).logits
        ll.merge(model)
        assert not ll.adapter_names(model) and not ll.extras.iter_extras(model)
        assert torch.allclose(model(**inputs).logits, hooked, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # as before attach: nothing is left frozen


def tied_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


NEW_TOKENS = (3, 5, 60)


def test_trainable_token_rows_train_only_their_rows_in_and_out_and_save_only_them(tmp_path):
    base = tied_llama()
    model = copy.deepcopy(base)
    before = fingerprint(model)
    ids = torch.tensor([[3, 10, 5, 60, 11, 3]])
    with torch.no_grad():
        y_base = model(ids).logits
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), trainable_token_indices=NEW_TOKENS))
    with torch.no_grad():  # the rows start as the original rows; the tied head recomputes their logits
        assert torch.allclose(model(ids).logits, y_base, rtol=0, atol=1e-6)
    (rows,) = [e for e in ll.extras.iter_extras(model) if not e.tied]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        assert rows.rows.grad is not None and rows.rows.grad.abs().min(dim=1).values.gt(0).all()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # W itself never moves
    with torch.no_grad():
        out = model(ids).logits
        # output side (tied head): the new tokens' logits come from the trained rows
        h = model.model(ids).last_hidden_state  # already normed
        assert torch.allclose(out[..., list(NEW_TOKENS)], h @ rows.rows.T, atol=1e-5)
        others = [i for i in range(64) if i not in NEW_TOKENS]
    path = ll.save(model, tmp_path / "tokens.safetensors")
    (entry,) = read_adapter_file(path).values()
    assert entry[2]["model.embed_tokens.lora_tokens.rows"].shape == (3, 32)  # only the rows, not the embedding
    assert entry[3]["token_rows"] == {"embedding": "model.embed_tokens", "tied_head": "lm_head"}
    fresh = copy.deepcopy(base)
    ll.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
        assert not torch.equal(out[..., others], y_base[..., others])  # through the changed inputs
        merged = copy.deepcopy(model)
        ll.merge(merged)
        assert torch.allclose(merged(ids).logits, out, atol=1e-5)
    ll.detach(model)
    assert_unchanged(model, before)


def test_token_rows_round_trip_through_peft(tmp_path):
    base = tied_llama()
    model = copy.deepcopy(base)
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), trainable_token_indices=NEW_TOKENS))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[3, 10, 5, 60, 11, 3]])
    with torch.no_grad():
        out = model(ids).logits
    ll.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    again = copy.deepcopy(base)
    ll.import_peft(again, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, out, rtol=0, atol=1e-5)
        assert torch.equal(again(ids).logits, out)


@pytest.mark.parametrize("cfg,error,match", [
    (dict(modules_to_save=("no_such_head",)), ll.TargetError, "modules_to_save entry 'no_such_head' matches no module"),
    (dict(trainable_token_indices=(3, 64)), ll.TargetError, "ids up to 64 but 'model.embed_tokens' has 64 rows"),
    (dict(trainable_token_indices=(3, 3)), ll.ConfigError, "distinct non-negative"),
    (dict(target_names=(r"embed_tokens$",), exclude_names=(), trainable_token_indices=(3,)), ll.TargetError,
     "adapted by this adapter already"),
    (dict(target_names=(r"q_proj$",), modules_to_save=("model.layers.0.self_attn",)), ll.TargetError,
     "inside 'model.layers.0.self_attn', which modules_to_save trains whole"),
])
def test_refused_extras_touch_nothing(cfg, error, match):
    model = tied_llama()
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        ll.attach(model, ll.LoRAConfig(r=2, **{"target_names": (r"q_proj$",)} | cfg))
    assert_unchanged(model, before)


def test_a_module_and_token_rows_belong_to_one_adapter():
    model = tied_llama()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), modules_to_save=("mlp",),
                                   trainable_token_indices=(3, 4)), name="a")
    before = fingerprint(model)
    with pytest.raises(ll.AttachStateError, match="already trained whole by adapter 'a'"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"k_proj$",), modules_to_save=("mlp",)), name="b")
    with pytest.raises(ll.AttachStateError, match=r"already trains rows \[4\]"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"k_proj$",), trainable_token_indices=(4, 9)), name="b")
    after = fingerprint(model)
    assert after["params"] == before["params"] and after["modules"] == before["modules"]
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"k_proj$",), trainable_token_indices=(9,)), name="b")
    with pytest.raises(ll.AttachStateError, match="per_row cannot route"):
        with ll.per_row(model, ["a"]):
            pass


def test_saving_a_head_unfrozen_by_hand_says_it_is_not_saved(tmp_path):
    model = BY_NAME["bert_seq_cls"].build()
    ll.attach(model, ll.LoRAConfig(r=2))
    model.classifier.weight.requires_grad_(True)
    with pytest.warns(ll.errors.UnsavedParametersWarning, match=r"\['classifier\.weight'\].*modules_to_save"):
        ll.save(model, tmp_path / "a.safetensors")


def test_an_attach_that_fails_while_adding_extras_rolls_everything_back(monkeypatch):
    model = BY_NAME["qwen3_moe"].build()
    before = fingerprint(model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ll.extras.TokenRows, "__init__", interrupted)  # after the head is already trained whole
    cfg = ll.LoRAConfig(r=2, modules_to_save=("lm_head",), trainable_token_indices=(3,))
    with pytest.raises(KeyboardInterrupt):
        ll.attach(model, cfg)
    assert_unchanged(model, before)
    assert "forward" not in model.get_submodule("model.layers.0.mlp.experts").__dict__


@pytest.mark.parametrize("edit,match", [
    (lambda e: e["token_rows"].update(tied_head=None), "is tied to it that way"),
    (lambda e: e["token_rows"].update(embedding="model.norm"), "not an nn.Embedding"),
    (lambda e: e["token_rows"].update(embedding="model.nowhere"), "does not have"),
    (lambda e: e.update(modules_to_save=["model.layers.0.mlp"]), "do not match its config"),
])
def test_token_rows_and_saved_modules_in_a_file_must_fit_the_model(edit, match, tmp_path):
    import json

    from adapter_files import join, split

    model = tied_llama()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"q_proj$",), trainable_token_indices=(3,),
                                   modules_to_save=("model.norm",)))
    header, data = split(ll.save(model, tmp_path / "a.safetensors").read_bytes())
    meta = json.loads(header["__metadata__"]["adapters"])
    edit(meta["default"])
    header["__metadata__"]["adapters"] = json.dumps(meta)
    (tmp_path / "b.safetensors").write_bytes(join(header, data))
    fresh = tied_llama()
    before = fingerprint(fresh)
    with pytest.raises(ll.CheckpointError, match=match):
        ll.load(fresh, tmp_path / "b.safetensors")
    assert_unchanged(fresh, before)
