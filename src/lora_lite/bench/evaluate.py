"""Scoring: greedy generation + numeric answer match, answer NLL, and forgetting.

Every scorer returns per-item values (1.0/0.0 for a correct answer, nats per answer token for NLL), in the
order of the rows given, so two runs on the same questions can be compared item by item (stats.py). Items are
batched shortest first, which cuts the padding of left-padded batches, and put back in order afterwards.
NLL never holds more than LOGIT_BUDGET fp32 logits at once: a 248k-token vocabulary at batch 16 x 512 would
otherwise need ~8 GB for the log-softmax alone.
"""

from __future__ import annotations

import torch

from .. import distributed as lld
from ..errors import ConfigError
from .data import collate, encode_rows, position_ids, prompt_batches
from .protocol import extract_answer, format_prompt, reference_answer, show_number

LOGIT_BUDGET = 2 ** 25  # fp32 logits (128 MB) computed at once when scoring NLL


def _bar(total: int, desc: str | None):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="q", mininterval=2.0, leave=False,
                disable=desc is None or not lld.is_main_process())


def _shortest_first(seqs) -> list[int]:
    return sorted(range(len(seqs)), key=lambda i: len(seqs[i]))


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str | None = None) -> list[str]:
    """Greedy continuations (prompt not included), cut at eos."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tok.prefix + tok.encode(p) for p in prompts]
    order = _shortest_first(encoded)
    outputs: list[str | None] = [None] * len(prompts)
    bar = _bar(len(prompts), desc)
    start = 0
    for ids, mask in prompt_batches([encoded[i] for i in order], batch_size, tok.pad_id):
        ids, mask = ids.to(device), mask.to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        for offset, row in enumerate(out[:, ids.shape[1]:].tolist()):
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            outputs[order[start + offset]] = tok.decode(row)
        start += len(ids)
        bar.update(len(ids))
    bar.close()
    model.train(was_training)
    return outputs


def exact_match(model, tok, rows, max_new_tokens: int, batch_size: int, n_examples: int = 3,
                desc: str | None = None) -> dict:
    completions = generate(model, tok, [format_prompt(r["question"]) for r in rows], max_new_tokens, batch_size,
                           desc)
    scores, examples = [], []
    for row, text in zip(rows, completions, strict=True):
        pred, gold = extract_answer(text), reference_answer(row["answer"])
        scores.append(float(pred is not None and pred == gold))
        if len(examples) < n_examples:
            examples.append({"question": row["question"], "completion": text, "pred": show_number(pred),
                             "gold": show_number(gold)})
    return {"acc": 100.0 * sum(scores) / max(len(scores), 1), "scores": scores, "n": len(scores),
            "examples": examples}


@torch.no_grad()
def answer_nll(model, tok, rows, formatter, max_len: int, batch_size: int, desc: str | None = None) -> dict:
    """Mean NLL (nats/token) of each reference response given its prompt."""
    examples, too_long = encode_rows(rows, tok, formatter, max_len)
    if too_long:
        raise ConfigError(f"{too_long} eval examples are longer than max_seq_length={max_len} tokens; the session "
                          "leaves those out before scoring, so this is a bug in the caller")
    per_item = token_nll(model, [e[0] for e in examples], [e[1] for e in examples], tok.pad_id, batch_size,
                         desc=desc)
    return {"nll": sum(per_item) / len(per_item), "scores": per_item, "n": len(per_item)}


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


@torch.no_grad()
def token_nll(model, ids_list, labels_list, pad_id: int, batch_size: int, budget: int = LOGIT_BUDGET,
              desc: str | None = None) -> list[float]:
    """Mean NLL per sequence over its labelled tokens, holding at most `budget` fp32 logits at a time (and
    as few rows per forward as keep the model's own logits near that budget)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = _vocab_size(model)
    order = _shortest_first(ids_list)
    out: list[float | None] = [None] * len(ids_list)
    bar = _bar(len(ids_list), desc)
    i = 0
    while i < len(order):
        width = len(ids_list[order[min(i + batch_size, len(order)) - 1]])  # shortest first: the last is longest
        rows = max(1, min(batch_size, budget // max(width * vocab, 1)))
        picked = order[i:i + rows]
        b = collate([(ids_list[j], labels_list[j]) for j in picked], pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                       position_ids=b["position_ids"].to(device)).logits[:, :-1]  # position t predicts t + 1
        labels = b["labels"][:, 1:].to(device)
        nll_sum = torch.zeros(len(picked), dtype=torch.float64, device=device)
        per_chunk = max(1, budget // (vocab * len(picked)))
        for t in range(0, labels.shape[1], per_chunk):
            chunk = logits[:, t:t + per_chunk].float()
            target = labels[:, t:t + per_chunk]
            mask = target != -100
            picked_logit = chunk.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            nll_sum += ((chunk.logsumexp(-1) - picked_logit) * mask).sum(1).double()
        counts = (labels != -100).sum(1).clamp_min(1)
        for j, value in zip(picked, (nll_sum / counts).tolist(), strict=True):
            out[j] = value
        del logits
        i += rows
        bar.update(len(picked))
    bar.close()
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


def text_nll(model, sequences: list[list[int]], pad_id: int, batch_size: int, desc: str | None = None) -> float:
    """Mean per-token NLL over whole sequences (every token after the first is predicted)."""
    per_seq = token_nll(model, sequences, [[-100] + s[1:] for s in sequences], pad_id, batch_size, desc=desc)
    return sum(per_seq) / len(per_seq)
