"""The `qwen` preset end to end on CPU: a toy Qwen3.5 (hybrid linear / full attention) built from a config, with
small local files in the preset's formats: MetaMathQA (query/response), GSM8K (train.jsonl + test.jsonl) and
wikitext (text). Every stage runs: plan, data, bf16 base, fp32 adapters, training with checkpoints, scoring,
forgetting on wikitext with the chunked log-softmax, the report."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

import lora_lite as ll  # noqa: E402
from lora_lite.bench import tiny  # noqa: E402
from lora_lite.bench.cli import main  # noqa: E402


def _toy_qwen35(folder, texts):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    cfg = Qwen3_5TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8,
                            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
                            layer_types=["linear_attention", "full_attention"], max_position_embeddings=512,
                            eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def local_qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-preset")
    rng = random.Random(0)
    rows = [tiny.task_example(rng) for _ in range(120)]
    _write_jsonl(root / "metamath.jsonl", [{"query": r["question"], "response": r["answer"]} for r in rows[:80]])
    (root / "gsm8k").mkdir()
    _write_jsonl(root / "gsm8k" / "train.jsonl", rows[80:100])
    _write_jsonl(root / "gsm8k" / "test.jsonl", rows[100:])
    wiki = [" ".join(f"The {w} of the river rose in spring." for w in ("bank", "mouth", "bed", "source", "course",
                                                                      "delta", "valley")) for _ in range(6)]
    _write_jsonl(root / "wikitext.jsonl", [{"text": t} for t in wiki])
    _toy_qwen35(root / "model", [f"Question: {r['question']} Think step by step.\nAnswer: {r['answer']}"
                                 for r in rows] + wiki)
    return root


def test_qwen_preset_runs_every_stage_on_local_files(local_qwen, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--preset", "qwen", "--model", str(local_qwen / "model"),
               "--train-data", str(local_qwen / "metamath.jsonl"), "--eval-data", str(local_qwen / "gsm8k"),
               "--forget-data", str(local_qwen / "wikitext.jsonl"), "--variants", "lora", "dora", "--steps", "3",
               "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every", "1", "--max-test", "4",
               "--max-valid", "2", "--max-new-tokens", "6", "--batch-size-eval", "2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "bench qwen: 2 method(s)" in printed and "expected time" in printed
    assert "forgetting (6 texts)" in printed
    for variant in ("lora", "dora"):
        run = next(out.glob(f"model__{variant}__*"))
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "ok" and result["settings"]["dtype"] == "bfloat16"
        (_, _, tensors, _), = ll.io.read_adapter_file(run / "adapter.safetensors").values()
        assert {t.dtype for t in tensors.values()} == {torch.float32} and result["train"]["losses"][-1] > 0
        assert len(result["test"]["acc_scores"]) == 4 and result["forgetting"] == result["forgetting"]
    assert "| lora |" in (out / "results.md").read_text()
