"""One benchmark session: load the tokenizer, the data and the base once, score the untrained base, then train
and score one run per (variant, lr, seed). Each run writes `run_dir/result.json` and `run_dir/adapter.safetensors`.

A run's folder is named by its settings: `{model}__{variant}__lr{lr}__seed{seed}__{key}`, where `key` hashes
every setting that changes its numbers (the adapter config, lr, seed, steps, batch sizes, sequence and
generation lengths, eval and forgetting sizes, the data files' contents, the base model and its dtype, and the
torch / transformers versions and device kind). A finished run is reused, and a checkpoint resumed, only by
the very same settings; anything else gets a folder of its own. The untrained base's scores are cached the
same way, keyed by the settings it depends on.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import lora_lite as ll

from .. import distributed as lld
from ..errors import CheckpointError, ConfigError, LoraLiteError
from ..io import atomic_write_bytes
from . import evaluate as ev
from .data import HFTokenizer, encode_rows, load_rows, make_batches, shuffled
from .env import environment, fingerprint, identity, settings_key
from .plan import offline_hint
from .presets import Preset, VariantSettings
from .protocol import format_example
from .report import append_summary
from .train import DivergedError, StopFlag, TrainSettings, attach_or_resume, train, trainable_named

CALIBRATION_BATCHES = 4
PROTOCOL_VERSION = 2  # bump when scoring or training changes in a way no setting records
TRAIN_DEFAULTS = TrainSettings(steps=0, lr=0.0)  # weight decay and clipping every run uses


@dataclass
class Options:
    """Everything a run depends on besides the variant settings (preset values after CLI overrides)."""
    preset: Preset
    output_dir: Path
    cache_dir: Path
    device: str = "cpu"
    pretrain_steps: int | None = None
    overwrite: bool = False
    threads: int | None = None
    mode: str = "benchmark"


def read_result(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); delete it (or pass --overwrite) to redo that run") from None
    if not isinstance(data, dict) or "status" not in data:
        raise CheckpointError(f"{path} is not a result this bench wrote; delete it (or pass --overwrite) to redo it")
    return data


class Bench:
    def __init__(self, opt: Options, log=print) -> None:
        self.opt, self.p, self.log = opt, opt.preset, log
        self.reused = False  # whether the last run() reused a finished result
        self.env = environment(opt.device, opt.threads)
        self.scoring = opt.mode == "benchmark"
        self.tok, self._tiny_spec = self._tokenizer()
        self.data_report: dict = {}
        self.valid_rows, self.test_rows, self._train_rows = self._load_rows()
        self.model, self.model_tag = self._load_model()
        self.forget_seqs = self._forget_text() if self.scoring else []
        if self.scoring:
            self.log(f"base: forgetting reference on {len(self.forget_seqs)} texts")
            self.base_forget_nll = ev.text_nll(self.model, self.forget_seqs, self.tok.pad_id, self.p.batch_size_eval)

    # ---- loading -------------------------------------------------------------------------------------------
    def _tokenizer(self):
        if self.p.model == "tiny":
            from . import tiny
            spec = tiny.TinySpec(**({"pretrain_steps": self.opt.pretrain_steps} if self.opt.pretrain_steps else {}))
            return tiny.CharTokenizer(), spec
        from transformers import AutoTokenizer
        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(self.p.model)), None
        except OSError as e:
            raise ConfigError(f"could not load the tokenizer of --model {self.p.model!r}: {_first_line(e)}."
                              + offline_hint(self.p, self.opt.mode)) from None

    def _load_model(self):
        p = self.p
        dtype = getattr(torch, p.dtype)
        if p.model == "tiny":
            from . import tiny
            with lld.main_process_first():  # rank 0 pre-trains and caches the base; the others load the cache
                model, _ = tiny.pretrained_base(self._tiny_spec, self.opt.cache_dir, log=self.log)
            return model.to(device=self.opt.device, dtype=dtype), f"tiny-{self._tiny_spec.key()}"
        from transformers import AutoModelForCausalLM
        self.log(f"base: loading {p.model} ({p.dtype})")
        try:
            model = AutoModelForCausalLM.from_pretrained(p.model, dtype=dtype)
        except OSError as e:
            raise ConfigError(f"could not load --model {p.model!r}: {_first_line(e)}." + offline_hint(p, self.opt.mode)
                              ) from None
        model = model.to(self.opt.device).eval()
        model.config.use_cache = True
        tag = Path(p.model).name if Path(p.model).exists() else p.model.replace("/", "--")
        return model, tag

    def _fitting(self, rows, limit: int | None, what: str) -> list[dict]:
        """The first `limit` rows whose whole example fits max_seq_length; counts what was left out."""
        kept, examined = [], 0
        for row in rows:
            if limit is not None and len(kept) >= limit:
                break
            examined += 1
            if encode_rows([row], self.tok, format_example, self.p.max_seq_length)[0]:
                kept.append(row)
        self.data_report[what] = {"scored": len(kept), "examined": examined, "too_long": examined - len(kept)}
        if examined > len(kept):
            self.log(f"data: {what}: {examined - len(kept)} of the first {examined} questions are longer than "
                     f"max_seq_length={self.p.max_seq_length} tokens and are left out; {len(kept)} are scored")
        return kept

    def _load_rows(self):
        """(valid, test, train) rows; train is None for the generated tiny task (drawn per seed)."""
        p = self.p
        self.log(f"data: loading {p.train_data}" + (f" and {p.eval_data}" if self.scoring else ""))
        valid, test = [], []
        if self.scoring and p.eval_data == "tiny":
            from . import tiny
            valid = self._fitting(tiny.task_rows("valid", p.max_valid), p.max_valid, "valid")
            test = self._fitting(tiny.task_rows("test", p.max_test or tiny.TEST_POOL), p.max_test, "test")
        elif self.scoring:
            pool = load_rows(p.eval_data, "train", p.eval_config, flag="--eval-data")
            valid = self._fitting(shuffled(pool, 0), p.max_valid, "valid")  # the same questions for every seed
            test = self._fitting(load_rows(p.eval_data, "test", p.eval_config, flag="--eval-data"), p.max_test,
                                 "test")
            if not valid or not test:
                raise ConfigError(f"no {'valid' if not valid else 'test'} question of {p.eval_data} fits "
                                  f"max_seq_length={p.max_seq_length}; raise --max-seq-length")
        if p.train_data == "tiny":
            return valid, test, None
        held = {r["question"] for r in valid} | {r["question"] for r in test}
        return valid, test, [r for r in load_rows(p.train_data, "train") if r["question"] not in held]

    def _forget_text(self) -> list[list[int]]:
        p = self.p
        if p.forget_data == "self":
            self.log(f"base: sampling {p.forget_n} texts of {p.forget_len} tokens for forgetting")
            return ev.self_generated_text(self.model, self.tok, p.forget_n, p.forget_len, seed=0)
        source, _, config = p.forget_data.partition(":")
        if Path(source).expanduser().exists():
            from .data import read_jsonl
            rows = read_jsonl(Path(source).expanduser())
            if rows and "text" not in rows[0]:
                raise ConfigError(f"--forget-data {source}: rows need a 'text' field, found {sorted(rows[0])}")
            texts = [r["text"] for r in rows]
        else:
            from .data import hub_rows
            texts = [r["text"] for r in hub_rows(source, config or None, "test", "--forget-data")]
        texts = [t for t in texts if isinstance(t, str) and len(t) > 200][: p.forget_n]
        if not texts:
            raise ConfigError(f"forgetting text {p.forget_data!r} has no passage longer than 200 characters")
        # Language-model loss over a window of each passage: cutting a passage at max_seq_length is harmless.
        return [(self.tok.prefix + self.tok.encode(t))[: p.max_seq_length] for t in texts]

    def train_batches(self, seed: int) -> tuple[list[dict], dict]:
        """The run's micro-batches (fixed up front) and what was left out to make them."""
        p = self.p
        need = p.steps * p.grad_accum * p.batch_size
        if self._train_rows is None:
            from . import tiny
            rows = tiny.task_rows("train", 2 * need, seed)
        else:
            rows = shuffled(self._train_rows, seed)
        examples, too_long, examined = [], 0, 0
        for start in range(0, len(rows), 4 * need):  # encode lazily: MetaMathQA has 395k rows
            chunk = rows[start:start + 4 * need]
            got, dropped = encode_rows(chunk, self.tok, format_example, p.max_seq_length)
            examples += got
            too_long += dropped
            examined += len(chunk)
            if len(examples) >= need:
                break
        if len(examples) < need:
            raise ConfigError(f"only {len(examples)} training examples fit max_seq_length={p.max_seq_length} "
                              f"({too_long} longer); {p.steps} steps x {p.grad_accum} x {p.batch_size} need {need}")
        report = {"examples": need, "examined": examined, "too_long": too_long}
        return make_batches(examples[:need], p.batch_size, self.tok.pad_id), report

    # ---- identity ------------------------------------------------------------------------------------------
    def eval_settings(self) -> dict:
        """Every setting the untrained base's scores depend on."""
        p = self.p
        base = {"tiny": self._tiny_spec.cache_record()} if self._tiny_spec else {"fingerprint": fingerprint(p.model)}
        return {"protocol": PROTOCOL_VERSION, "model": p.model, "model_id": base, "dtype": p.dtype,
                "metric": p.metric, "eval_data": p.eval_data, "eval_data_id": fingerprint(p.eval_data),
                "eval_config": p.eval_config, "max_valid": p.max_valid, "max_test": p.max_test,
                "max_seq_length": p.max_seq_length, "max_new_tokens": p.max_new_tokens,
                "batch_size_eval": p.batch_size_eval, "forget_data": p.forget_data,
                "forget_data_id": fingerprint(p.forget_data.partition(":")[0]), "forget_n": p.forget_n,
                "forget_len": p.forget_len, "env": identity(self.opt.device)}

    def run_settings(self, vs: VariantSettings, seed: int) -> dict:
        p, t = self.p, TRAIN_DEFAULTS
        return {**self.eval_settings(), "train_data": p.train_data, "train_data_id": fingerprint(p.train_data),
                "steps": p.steps, "batch_size": p.batch_size, "grad_accum": p.grad_accum,
                "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "calibration_batches": CALIBRATION_BATCHES,
                "variant": vs.cfg.variant, "config": vs.cfg.to_dict(), "lr": vs.lr, "seed": seed}

    def run_id(self, vs: VariantSettings, seed: int) -> str:
        row = (vs.label or vs.cfg.variant).replace(":", "+").replace(",", "+")  # lora:use_rslora=true -> lora+use_rslora=true
        return f"{self.model_tag}__{row}__lr{vs.lr:g}__seed{seed}__{settings_key(self.run_settings(vs, seed))}"

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, model, rows, label: str) -> dict:
        """Per-item scores in `rows` order. Under several processes each rank scores a contiguous slice and
        every rank gets all scores back."""
        p = self.p
        mine = lld.shard_list(rows)
        em = ev.exact_match(model, self.tok, mine, p.max_new_tokens, p.batch_size_eval, desc=f"{label} answers")
        scores = lld.gather_list(em["scores"])
        out = {"acc": 100.0 * sum(scores) / max(len(scores), 1), "acc_scores": scores, "n": len(scores),
               "examples": lld.gather_list(em["examples"])[:3]}
        if p.metric == "nll":
            nll = ev.answer_nll(model, self.tok, mine, format_example, p.max_seq_length, p.batch_size_eval,
                                desc=f"{label} answer NLL")
            nll_scores = lld.gather_list(nll["scores"])
            out.update(nll=sum(nll_scores) / len(nll_scores), nll_scores=nll_scores)
        return out

    def _score_all(self, model, label: str) -> dict:
        out = {}
        for split, rows in (("valid", self.valid_rows), ("test", self.test_rows)):
            self.log(f"{label}: scoring {split} ({len(rows)} questions)")
            out[split] = self.score(model, rows, f"{label}: {split}")
        self.log(f"{label}: forgetting ({len(self.forget_seqs)} texts)")
        out["forgetting"] = ev.text_nll(model, self.forget_seqs, self.tok.pad_id, self.p.batch_size_eval) - \
            self.base_forget_nll
        return out

    def base_result(self) -> dict:
        """Scores of the untrained base (the floor every adapter must clear); cached in the output dir."""
        settings = self.eval_settings()
        key = settings_key(settings)
        path = self.opt.output_dir / f"{self.model_tag}__base__{key}" / "result.json"
        if path.is_file() and not self.opt.overwrite:
            previous = read_result(path)
            if previous.get("settings_key") != key:
                raise CheckpointError(f"{path} holds settings key {previous.get('settings_key')!r}, but its folder "
                                      f"name says {key!r} (the folder was edited or copied); delete it or pass "
                                      "--overwrite")
            self.log(f"base: scored earlier, reusing {path}")
            return previous
        start = time.perf_counter()
        scored = self._score_all(self.model, "base")
        result = {"variant": "base", "run_id": path.parent.name, "preset": self.p.name, "model": self.p.model,
                  "valid": scored["valid"], "test": scored["test"], "trainable_params": 0, "forgetting": 0.0,
                  "base_forget_nll": self.base_forget_nll, "wall_time_s": time.perf_counter() - start,
                  "status": "ok", "settings_key": key, "settings": settings, "data": self.data_report,
                  "environment": self.env}
        if lld.is_main_process():
            atomic_write_bytes(path, json.dumps(result, indent=1).encode())
        return result

    # ---- one run -------------------------------------------------------------------------------------------
    def run(self, vs: VariantSettings, seed: int, stop: StopFlag | None = None, on_step=None,
            label: str | None = None) -> dict:
        p, cfg = self.p, vs.cfg
        settings = self.run_settings(vs, seed)
        key = settings_key(settings)
        run_dir = self.opt.output_dir / self.run_id(vs, seed)
        label = label or f"{vs.label or cfg.variant} lr {vs.lr:g} seed {seed}"
        done = run_dir / "result.json"
        self.reused = done.is_file() and not self.opt.overwrite
        if self.reused:
            previous = read_result(done)
            if previous.get("settings_key") != key:
                raise CheckpointError(f"{done} holds settings key {previous.get('settings_key')!r}, but its folder "
                                      f"name says {key!r} (the folder was edited or copied); delete it or pass "
                                      "--overwrite")
            self.log(f"{label}: finished earlier ({previous['status']}), reusing {done}")
            if lld.is_main_process():
                append_summary(self.opt.output_dir, previous, p.metric)  # a row lost to a kill comes back
            return previous
        if self.opt.overwrite and run_dir.exists() and lld.is_main_process():
            shutil.rmtree(run_dir)
        lld.barrier()  # only rank 0 writes into run_dir; the others read what it wrote (init, checkpoints)
        run_dir.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter()
        batches, train_data = self.train_batches(seed)
        if train_data["too_long"]:
            self.log(f"{label}: {train_data['too_long']} of {train_data['examined']} training rows are longer than "
                     f"max_seq_length={p.max_seq_length} tokens and are left out")
        variant = ll.REGISTRY[cfg.variant]
        data_driven = getattr(variant, "requires_calibration", False) or hasattr(variant, "group_init")
        # labels too: gradient-based inits (lora_ga, lora_one) start from the training loss's gradient
        calibration = ([{k: b[k].to(self.opt.device) for k in ("input_ids", "attention_mask", "labels")}
                        for b in batches[:CALIBRATION_BATCHES]] if data_driven else None)
        model = copy.deepcopy(self.model)
        torch.manual_seed(seed)
        if data_driven:
            self.log(f"{label}: calibrating the init on {len(calibration)} batches")
        init_start = time.perf_counter()
        start_step = attach_or_resume(model, cfg, run_dir, calibration, log=self.log, settings_key=key,
                                      steps=p.steps)
        init_s = time.perf_counter() - init_start
        n_trainable = sum(p_.numel() for _, p_ in trainable_named(model))
        train_settings = TrainSettings(steps=p.steps, lr=vs.lr, grad_accum=p.grad_accum,
                                       checkpoint_every=p.checkpoint_every)
        result = {"run_id": run_dir.name, "variant": vs.label or cfg.variant, "preset": p.name, "model": p.model, "seed": seed,
                  "lr": vs.lr, "default_lr": vs.default_lr, "r": getattr(cfg, "r", None),
                  "alpha": getattr(cfg, "alpha", None), "config": cfg.to_dict(),
                  "targets": list(ll.runtime.adapter_layers(model)), "trainable_params": n_trainable,
                  "calibration_batches": len(calibration or []), "notes": list(vs.notes),
                  "preset_settings": _jsonable(p), "settings_key": key, "settings": settings,
                  "data": {**self.data_report, "train": train_data}, "environment": self.env,
                  "commit": self.env["commit"], "init_s": init_s}
        try:
            result["train"] = train(model, batches, train_settings, run_dir, start_step, stop=stop, on_step=on_step,
                                    label=f"{label}: train", settings_key=key)
        except DivergedError as e:
            result.update(status="diverged", error=str(e), wall_time_s=time.perf_counter() - wall,
                          time_utc=_utc(), processes=lld.world_size())
            if lld.is_main_process():
                atomic_write_bytes(done, json.dumps(result, indent=1).encode())
                append_summary(self.opt.output_dir, result, p.metric)
            self.log(f"{label}: {e}")
            return result
        (_, _, init_tensors, _), = ll.io.read_adapter_file(run_dir / "adapter_init.safetensors").values()
        result["adapter_delta"], result["adapter_unchanged"] = adapter_change(model, init_tensors)
        check_training(result)
        result.update(self._score_all(model, label))
        result.update(status="ok", wall_time_s=time.perf_counter() - wall, time_utc=_utc(),
                      processes=lld.world_size())
        if lld.is_main_process():
            ll.save(model, run_dir / "adapter.safetensors")
            atomic_write_bytes(done, json.dumps(result, indent=1).encode())
            append_summary(self.opt.output_dir, result, p.metric)
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        lld.barrier()
        return result


def adapter_change(model, init: dict) -> tuple[float, dict]:
    """(sum over adapter tensors of ||after - init||, and per tensor name the fraction of entries training left
    exactly at their init: near 1 means updates were lost to rounding, as with bf16 adapters at a small lr)."""
    total, same, count = 0.0, {}, {}
    for name, adapter in ll.runtime.adapter_layers(model).items():
        for tname in adapter.tensor_names:
            after = getattr(adapter, tname).detach().cpu()
            before = init[f"{name}.{tname}"].to(after.dtype)
            total += (after.float() - before.float()).norm().item()
            same[tname] = same.get(tname, 0) + int((after == before).sum())
            count[tname] = count.get(tname, 0) + after.numel()
    return total, {k: same[k] / count[k] for k in sorted(same)}


def check_training(result: dict) -> None:
    t = result["train"]
    if t["resumed_from_step"] == 0 and not (t["first_grad_norm"] and t["first_grad_norm"] > 0):
        raise LoraLiteError(f"{result['run_id']}: the adapter gradient norm is {t['first_grad_norm']} in the first "
                            "two steps; no gradient reaches the adapter (a zero-gradient init?)")
    if t["base_grad_leaks"]:
        raise LoraLiteError(f"{result['run_id']}: {t['base_grad_leaks']} base parameters received gradients")
    if not result["adapter_delta"] > 0:
        raise LoraLiteError(f"{result['run_id']}: training left the adapter unchanged (adapter_delta=0)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _jsonable(preset: Preset) -> dict:
    return json.loads(json.dumps(asdict(preset), default=str))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_LITE_CACHE", Path.home() / ".cache" / "lora-lite"))
