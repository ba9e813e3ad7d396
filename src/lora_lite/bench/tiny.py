"""The `tiny` preset: a download-free stand-in for MetaMathQA -> GSM8K that runs on 2 CPU cores.

Base domain (pre-training): one-digit arithmetic in a few phrasings, "What is 7 plus 4?", "Subtract 4 from 7.".
Held-out task (adaptation): word problems the base never saw,

    Question: Ann has 8 coins and gives away 3. How many now? Think step by step.
    Answer: 8-3=5
    #### 5

so solving them means mapping new verbs ("gets", "finds" -> plus; "gives away", "loses" -> minus) onto
skills the base has. The base mostly guesses the operation and the format; an adapter must learn the mapping.

Everything is built in code: a character tokenizer, a small Llama from a transformers config, and its
pre-training on generated text. Pre-training is deterministic (fixed seeds, fixed data) and its weights are
cached under the cache dir keyed by a hash of every setting and of the torch and transformers versions (another
version pre-trains another base), so later runs skip it. A cached file is used only if every tensor fits.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import atomic_write_bytes
from .protocol import format_example

CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-=#?.,:\n"
MAX_OPERAND = 9
TEST_POOL = 400
VALID_POOL = 200  # the most --max-valid can ask for; training draws avoid all of them
NAMES = ("Ann", "Bob", "Eva", "Max", "Sue", "Tom", "Lea", "Sam")
OBJECTS = ("coins", "pens", "cards", "apples", "books", "shells")
PLUS_VERBS = ("gets {b} more", "finds {b}", "buys {b} more", "wins {b}")
MINUS_VERBS = ("gives away {b}", "loses {b}", "sells {b}", "eats {b}")


class CharTokenizer:
    """Ids 0/1/2 are pad/bos/eos; every other id is one character of CHARS. Unknown characters raise."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.stoi = {c: i + 3 for i, c in enumerate(CHARS)}
        self.itos = {i: c for c, i in self.stoi.items()}
        self.vocab_size = len(CHARS) + 3

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            from ..errors import ConfigError
            raise ConfigError(f"the tiny preset's character tokenizer has no {e.args[0]!r}; its alphabet is "
                              f"{CHARS!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.itos.get(int(i), "") for i in ids)

    @property
    def prefix(self) -> list[int]:
        return [self.bos_id]


PLUS_TEMPLATES = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
                  "What do you get if you add {b} to {a}?")
MINUS_TEMPLATES = ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
                   "Take {b} away from {a}. What is left?")


def base_example(rng: random.Random) -> dict:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return {"question": rng.choice(PLUS_TEMPLATES).format(a=a, b=b), "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
    a, b = max(a, b), min(a, b)
    return {"question": rng.choice(MINUS_TEMPLATES).format(a=a, b=b), "answer": f"{a}-{b}={a - b}\n#### {a - b}"}


def task_example(rng: random.Random) -> dict:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.5:
        verb, op, c = rng.choice(PLUS_VERBS), "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        verb, op, c = rng.choice(MINUS_VERBS), "-", a - b
    question = f"{name} has {a} {obj} and {verb.format(b=b, o=obj)}. How many now?"
    return {"question": question, "answer": f"{a}{op}{b}={c}\n#### {c}"}


def task_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Held-out-task rows. Splits use disjoint RNG streams; test questions appear in no other split and valid
    questions in no training draw, so no seed trains on what it is scored on."""
    offsets = {"train": 1, "valid": 2, "test": 3}
    if split not in offsets:
        raise ValueError(f"split must be one of {sorted(offsets)}, got {split!r}")
    if split == "test" and n > TEST_POOL:
        raise ValueError(f"the tiny test split holds {TEST_POOL} questions; asked for {n}")
    held = set() if split == "test" else {r["question"] for r in _draw(task_example, 10_003, TEST_POOL)}
    if split == "train":
        held |= {r["question"] for r in _draw(task_example, 10_002, VALID_POOL, exclude=held)}
    if split == "valid" and n > VALID_POOL:
        raise ValueError(f"the tiny valid split holds {VALID_POOL} questions; asked for {n}")
    rng_seed = 10_000 + offsets[split] if split != "train" else 20_000 + seed
    return _draw(task_example, rng_seed, n, exclude=held)


def _draw(make, seed: int, n: int, exclude: set = frozenset()) -> list[dict]:
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        row = make(rng)
        if row["question"] not in exclude:
            rows.append(row)
    return rows


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 128
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """Every setting of the pre-training and the libraries that compute it: another torch or transformers
        gives another base, so it gets another cache entry (and another run id)."""
        return hashlib.sha1(json.dumps(self.cache_record(), sort_keys=True).encode()).hexdigest()[:12]

    def cache_record(self) -> dict:
        from .env import identity
        libraries = {k: v for k, v in identity("cpu").items() if k != "device"}  # pre-training runs on the CPU
        return {**asdict(self), "chars": CHARS, "max_operand": MAX_OPERAND, "v": 3, **libraries}


def build_model(spec: TinySpec, tok: CharTokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, use_cache=True)
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(cfg)


TIED_HEAD = "lm_head.weight"  # the output head shares the input embeddings (tie_word_embeddings)


def cached(spec: TinySpec, cache_dir: Path) -> bool:
    return (Path(cache_dir) / f"tiny-base-{spec.key()}.safetensors").is_file()


def pretrained_base(spec: TinySpec, cache_dir: Path, log=print):
    """The pre-trained tiny base (model in eval mode, tokenizer), from the cache or trained now and cached."""
    from safetensors.torch import save

    tok = CharTokenizer()
    model = build_model(spec, tok)
    path = Path(cache_dir) / f"tiny-base-{spec.key()}.safetensors"
    if path.is_file():
        _load_cached(model, path, spec)
        log(f"tiny base: loaded from cache {path}")
        return model.eval(), tok
    log(f"tiny base: pre-training {spec.pretrain_steps} steps (once; cached at {path})")
    _pretrain(model, tok, spec)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != TIED_HEAD}
    atomic_write_bytes(path, save(state, metadata={"spec": json.dumps(spec.cache_record(), sort_keys=True)}))
    return model.eval(), tok


def _load_cached(model, path: Path, spec: TinySpec) -> None:
    """Load the cached base; every tensor must be there with its shape (only the tied head is not stored)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    fix = f"delete {path} and rerun to pre-train it again"
    try:
        with safe_open(str(path), "pt") as f:
            stored = json.loads((f.metadata() or {}).get("spec", "null"))
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"the cached tiny base {path} is unreadable ({e}); {fix}") from None
    if stored != spec.cache_record():
        raise CheckpointError(f"the cached tiny base {path} was made with other settings ({stored}); {fix}")
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_HEAD}
    found = {k: v.shape for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise CheckpointError(f"the cached tiny base {path} does not fit the model ({wrong[:4]}); {fix}")
    model.load_state_dict(state, strict=False)  # the one key left out is the tied head, checked above


def _pretrain(model, tok: CharTokenizer, spec: TinySpec) -> None:
    from .data import encode_rows, make_batches
    from .train import cosine_factor

    rows = _draw(base_example, spec.seed, spec.pretrain_steps * spec.pretrain_batch)
    examples, _ = encode_rows(rows, tok, format_example, max_len=256, supervise_prompt=True)
    batches = make_batches(examples, spec.pretrain_batch, tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, spec.pretrain_steps, warmup=50))
    model.train()
    from tqdm.auto import tqdm
    bar = tqdm(batches, desc="tiny base: pre-training", unit="step", mininterval=2.0)
    for batch in bar:
        # Pre-training supervises the question too, so the base also models its own domain's prompts.
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
