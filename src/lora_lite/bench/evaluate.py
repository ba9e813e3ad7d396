"""Scoring: greedy generation + exact match, answer NLL, and forgetting.

Every scorer returns per-item values (1.0/0.0 for exact match, nats per answer token for NLL) so that two
runs on the same questions can be compared with a paired test (stats.py).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .data import collate, encode_rows, position_ids, prompt_batches
from .protocol import extract_answer, format_prompt, reference_answer


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations (prompt not included), cut at eos."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tok.prefix + tok.encode(p) for p in prompts]
    outputs = []
    for ids, mask in prompt_batches(encoded, batch_size, tok.pad_id):
        ids, mask = ids.to(device), mask.to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        for row in out[:, ids.shape[1]:].tolist():
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            outputs.append(tok.decode(row))
    model.train(was_training)
    return outputs


def exact_match(model, tok, rows, max_new_tokens: int, batch_size: int, n_examples: int = 3) -> dict:
    completions = generate(model, tok, [format_prompt(r["question"]) for r in rows], max_new_tokens, batch_size)
    scores, examples = [], []
    for row, text in zip(rows, completions, strict=True):
        pred, gold = extract_answer(text), reference_answer(row["answer"])
        scores.append(float(pred == gold))
        if len(examples) < n_examples:
            examples.append({"question": row["question"], "completion": text, "pred": pred, "gold": gold})
    return {"acc": 100.0 * sum(scores) / max(len(scores), 1), "scores": scores, "n": len(scores),
            "examples": examples}


@torch.no_grad()
def answer_nll(model, tok, rows, formatter, max_len: int, batch_size: int) -> dict:
    """Mean NLL (nats/token) of each reference response given its prompt; rows too long are truncated."""
    examples, skipped = encode_rows(rows, tok, formatter, max_len)
    if skipped:
        raise ConfigError(f"{skipped} eval prompts have max_seq_length={max_len} tokens or more, so their answers "
                          "cannot be scored; raise --max-seq-length")
    per_item = token_nll(model, [e[0] for e in examples], [e[1] for e in examples], tok.pad_id, batch_size)
    return {"nll": sum(per_item) / len(per_item), "scores": per_item, "n": len(per_item)}


@torch.no_grad()
def token_nll(model, ids_list, labels_list, pad_id: int, batch_size: int) -> list[float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids_list), batch_size):
        b = collate(list(zip(ids_list[i:i + batch_size], labels_list[i:i + batch_size], strict=True)), pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                       position_ids=b["position_ids"].to(device)).logits.float()
        labels = b["labels"][:, 1:].to(device)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != -100
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        out += (nll.sum(1) / mask.sum(1).clamp_min(1)).tolist()
    model.train(was_training)
    return out


@torch.no_grad()
def self_generated_text(model, tok, n: int, length: int, seed: int) -> list[list[int]]:
    """Token sequences the base samples from its own distribution (temperature 1), starting from bos (or eos
    for tokenizers without bos). The base's loss on its own samples is what an adapter may damage."""
    device = next(model.parameters()).device
    start = tok.prefix[-1:] or [tok.eos_id]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([start] * n, device=device)
    mask = torch.ones_like(ids)
    model.eval()
    for _ in range(length):  # a plain sampling loop, so the sample depends only on `seed`, not on generate()'s RNG
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen).to(device)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids.tolist()


def text_nll(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> float:
    """Mean per-token NLL over whole sequences (every token after the first is predicted)."""
    per_seq = token_nll(model, sequences, [[-100] + s[1:] for s in sequences], pad_id, batch_size)
    return sum(per_seq) / len(per_seq)
