"""Rows, tokenisation and left-padded batches.

Rows are dicts with `question` and `answer` (GSM8K field names; MetaMathQA's `query`/`response` are renamed).
They come from a local .jsonl file or a Hugging Face dataset id. An example is
    prefix (bos if the tokenizer adds one) + encode(prompt) | encode(" " + answer) + eos
with labels -100 over the prompt part, so the loss covers only the response. An example longer than
max_seq_length is left out, never cut: a cut one would lose its eos and its "####" line (the count of left-out
rows is logged and kept in result.json). Batches are padded on the left,
as generation needs, with attention_mask 0 and labels -100 on the padding, and position ids that start at 0
on the first real token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import ConfigError

_FIELD_ALIASES = {"query": "question", "response": "answer"}


class HFTokenizer:
    """The small tokenizer interface the bench uses (encode/decode/prefix/eos_id/pad_id) over a HF tokenizer."""

    def __init__(self, tok) -> None:
        if tok.eos_token_id is None:
            raise ConfigError(f"tokenizer {tok.name_or_path!r} has no eos token; the protocol appends eos to every "
                              "response so generation can stop")
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with_special = tok("a", add_special_tokens=True).input_ids
        plain = tok("a", add_special_tokens=False).input_ids
        self.prefix = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []

    def encode(self, text: str) -> list[int]:
        # verbose=False: the "longer than the maximum sequence length" warning is ours to give (encode_rows)
        return self.tok(text, add_special_tokens=False, verbose=False).input_ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_rows(source: str, split: str, config: str | None = None, limit: int | None = None,
              flag: str = "--train-data") -> list[dict]:
    """Rows from a .jsonl file, a directory holding {split}.jsonl, or a hub dataset id (needs `datasets`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{flag}: data file {str(path)!r} does not exist; pass a .jsonl file, a folder with "
                              f"{split}.jsonl, or a hub dataset id")
        rows = read_jsonl(path)
    else:
        rows = hub_rows(source, config, split, flag)
    rows = [{_FIELD_ALIASES.get(k, k): v for k, v in r.items()} for r in rows]
    if rows and not {"question", "answer"} <= set(rows[0]):
        raise ConfigError(f"{flag} {source!r}: rows have fields {sorted(rows[0])}; need question/answer or "
                          "query/response")
    return rows[:limit] if limit is not None else rows


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {i} is not JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {i} is a {type(row).__name__}, not a JSON object")
            rows.append(row)
    return rows


def hub_rows(source: str, config: str | None, split: str, flag: str) -> list[dict]:
    """A hub dataset split; any failure to get it (offline, no such dataset) is one error that names the flag."""
    from datasets import load_dataset

    try:
        return list(load_dataset(source, config, split=split))
    except Exception as e:  # datasets raises many unrelated types for "could not get it"; each becomes this one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not load hub dataset {source!r} (split {split}): {first}. Without the hub, pass a "
                          f"local copy with {flag}") from None


def shuffled(rows: list, seed: int) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def encode_rows(rows, tok, formatter, max_len: int, supervise_prompt: bool = False):
    """[(input_ids, labels)] for the rows whose whole example fits in max_len; returns (examples, n_too_long)."""
    examples, too_long = [], 0
    for row in rows:
        prompt, response = formatter(row)
        p = tok.prefix + tok.encode(prompt)
        ids = p + tok.encode(response) + [tok.eos_id]
        if len(ids) > max_len:
            too_long += 1
            continue
        labels = list(ids) if supervise_prompt else [-100] * len(p) + ids[len(p):]
        examples.append((ids, labels))
    return examples, too_long


def pad_left(seqs, pad_value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[pad_value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)


def collate(examples, pad_id: int) -> dict:
    ids = pad_left([e[0] for e in examples], pad_id)
    mask = pad_left([[1] * len(e[0]) for e in examples], 0)
    labels = pad_left([e[1] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids(mask)}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def make_batches(examples, batch_size: int, pad_id: int) -> list[dict]:
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def prompt_batches(prompts: list[list[int]], batch_size: int, pad_id: int):
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        mask = pad_left([[1] * len(p) for p in chunk], 0)
        yield pad_left(chunk, pad_id), mask
