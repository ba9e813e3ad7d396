"""One benchmark session: load the base and the data once, score the untrained base, then train and score one
run per (variant, lr, seed). Each run writes `run_dir/result.json` and `run_dir/adapter.safetensors`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import lora_lite as ll

from .. import distributed as lld
from ..errors import ConfigError, LoraLiteError
from ..io import atomic_write_bytes
from . import evaluate as ev
from .data import HFTokenizer, encode_rows, load_rows, make_batches, shuffled
from .presets import Preset, VariantSettings
from .protocol import format_example
from .report import append_summary
from .train import DivergedError, StopFlag, TrainSettings, attach_or_resume, train, trainable_named

CALIBRATION_BATCHES = 4


@dataclass
class Options:
    """Everything a run depends on besides the variant settings (preset values after CLI overrides)."""
    preset: Preset
    output_dir: Path
    cache_dir: Path
    device: str = "cpu"
    pretrain_steps: int | None = None
    overwrite: bool = False


class Bench:
    def __init__(self, opt: Options, log=print) -> None:
        self.opt, self.p, self.log = opt, opt.preset, log
        self.model, self.tok, self.model_tag = self._load_model()
        self.valid_rows, self.test_rows, self._train_rows = self._load_eval_rows()
        self.forget_seqs = self._forget_text()
        self.base_forget_nll = ev.text_nll(self.model, self.forget_seqs, self.tok.pad_id, self.p.batch_size_eval)

    # ---- loading -------------------------------------------------------------------------------------------
    def _load_model(self):
        p = self.p
        if p.model == "tiny":
            from . import tiny
            spec = tiny.TinySpec(**({"pretrain_steps": self.opt.pretrain_steps} if self.opt.pretrain_steps else {}))
            with lld.main_process_first():  # rank 0 pre-trains and caches the base; the others load the cache
                model, tok = tiny.pretrained_base(spec, self.opt.cache_dir, log=self.log)
            return model.to(self.opt.device), tok, f"tiny-{spec.key()}"
        from transformers import AutoModelForCausalLM, AutoTokenizer
        dtype = getattr(torch, p.dtype)
        model = AutoModelForCausalLM.from_pretrained(p.model, dtype=dtype).to(self.opt.device).eval()
        model.config.use_cache = True
        tok = HFTokenizer(AutoTokenizer.from_pretrained(p.model))
        tag = Path(p.model).name if Path(p.model).exists() else p.model.replace("/", "--")
        return model, tok, tag

    def _load_eval_rows(self):
        p = self.p
        if p.eval_data == "tiny":
            from . import tiny
            return tiny.task_rows("valid", p.max_valid), tiny.task_rows("test", p.max_test or tiny.TEST_POOL), None
        pool = load_rows(p.eval_data, "train", p.eval_config)
        valid = shuffled(pool, 0)[: p.max_valid]  # fixed questions for every seed, so lr picks are paired
        test = load_rows(p.eval_data, "test", p.eval_config, limit=p.max_test)
        held = {r["question"] for r in valid} | {r["question"] for r in test}
        train_rows = [r for r in load_rows(p.train_data, "train") if r["question"] not in held]
        return valid, test, train_rows

    def _forget_text(self) -> list[list[int]]:
        p = self.p
        if p.forget_data == "self":
            return ev.self_generated_text(self.model, self.tok, p.forget_n, p.forget_len, seed=0)
        source, _, config = p.forget_data.partition(":")
        if Path(source).exists():
            texts = [json.loads(line)["text"] for line in open(source) if line.strip()]
        else:
            from datasets import load_dataset
            texts = list(load_dataset(source, config or None, split="test")["text"])
        texts = [t for t in texts if len(t) > 200][: p.forget_n]
        if not texts:
            raise ConfigError(f"forgetting text {p.forget_data!r} has no passage longer than 200 characters")
        return [(self.tok.prefix + self.tok.encode(t))[: p.max_seq_length] for t in texts]

    def train_batches(self, seed: int) -> list[dict]:
        p = self.p
        need = p.steps * p.grad_accum * p.batch_size
        if self._train_rows is None:
            from . import tiny
            rows = tiny.task_rows("train", need, seed)
        else:
            rows = shuffled(self._train_rows, seed)
        examples, skipped = [], 0
        for start in range(0, len(rows), 4 * need):  # encode lazily: MetaMathQA has 395k rows
            got, s = encode_rows(rows[start:start + 4 * need], self.tok, format_example, p.max_seq_length)
            examples += got
            skipped += s
            if len(examples) >= need:
                break
        if len(examples) < need:
            raise ConfigError(f"only {len(examples)} training examples fit max_seq_length={p.max_seq_length} "
                              f"({skipped} skipped); {p.steps} steps x {p.grad_accum} x {p.batch_size} need {need}")
        return make_batches(examples[:need], p.batch_size, self.tok.pad_id)

    # ---- scoring -------------------------------------------------------------------------------------------
    def score(self, model, rows) -> dict:
        """Per-item scores in `rows` order. Under several processes each rank scores a contiguous slice and
        every rank gets all scores back."""
        p = self.p
        mine = lld.shard_list(rows)
        em = ev.exact_match(model, self.tok, mine, p.max_new_tokens, p.batch_size_eval)
        scores = lld.gather_list(em["scores"])
        out = {"acc": 100.0 * sum(scores) / max(len(scores), 1), "acc_scores": scores, "n": len(scores),
               "examples": lld.gather_list(em["examples"])[:3]}
        if p.metric == "nll":
            nll = ev.answer_nll(model, self.tok, mine, format_example, p.max_seq_length, p.batch_size_eval)
            nll_scores = lld.gather_list(nll["scores"])
            out.update(nll=sum(nll_scores) / len(nll_scores), nll_scores=nll_scores)
        return out

    def forgetting(self, model) -> float:
        return ev.text_nll(model, self.forget_seqs, self.tok.pad_id, self.p.batch_size_eval) - self.base_forget_nll

    def base_result(self) -> dict:
        """Scores of the untrained base (the floor every adapter must clear); cached in the output dir."""
        path = self.opt.output_dir / f"{self.model_tag}__base" / "result.json"
        if path.is_file() and not self.opt.overwrite:
            return json.loads(path.read_text())
        start = time.perf_counter()
        result = {"variant": "base", "run_id": path.parent.name, "preset": self.p.name, "model": self.p.model,
                  "valid": self.score(self.model, self.valid_rows), "test": self.score(self.model, self.test_rows),
                  "trainable_params": 0, "forgetting": 0.0, "base_forget_nll": self.base_forget_nll,
                  "wall_time_s": time.perf_counter() - start, "status": "ok"}
        if lld.is_main_process():
            atomic_write_bytes(path, json.dumps(result, indent=1).encode())
        return result

    # ---- one run -------------------------------------------------------------------------------------------
    def run_id(self, vs: VariantSettings, seed: int) -> str:
        row = vs.label.replace(":", "+").replace(",", "+")  # lora:use_rslora=true -> lora+use_rslora=true
        rid = f"{self.model_tag}__{row}__s{self.p.steps}__seed{seed}"
        if getattr(vs.cfg, "r", None) != vs.default_r:
            rid += f"__r{vs.cfg.r}"
        if vs.lr != vs.default_lr:
            rid += f"__lr{vs.lr:g}"
        return rid

    def run(self, vs: VariantSettings, seed: int, stop: StopFlag | None = None, on_step=None) -> dict:
        p, cfg = self.p, vs.cfg
        run_dir = self.opt.output_dir / self.run_id(vs, seed)
        done = run_dir / "result.json"
        if done.is_file() and not self.opt.overwrite:
            previous = json.loads(done.read_text())
            if previous["lr"] != vs.lr or previous["config"] != json.loads(cfg.to_json()):
                raise ConfigError(f"{done} was written with lr={previous['lr']:g}, config {previous['config']}, but "
                                  f"this run asks for lr={vs.lr:g}, config {cfg.to_dict()} (the defaults table or "
                                  "a flag changed). Pass --overwrite to redo it, or use another --output-dir")
            self.log(f"{run_dir.name}: finished earlier, reusing {done}")
            return previous
        if self.opt.overwrite and run_dir.exists() and lld.is_main_process():
            shutil.rmtree(run_dir)
        lld.barrier()  # only rank 0 writes into run_dir; the others read what it wrote (init, checkpoints)
        run_dir.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter()
        batches = self.train_batches(seed)
        variant = ll.REGISTRY[cfg.variant]
        data_driven = getattr(variant, "requires_calibration", False) or hasattr(variant, "group_init")
        # labels too: gradient-based inits (lora_ga, lora_one) start from the training loss's gradient
        calibration = ([{k: b[k].to(self.opt.device) for k in ("input_ids", "attention_mask", "labels")}
                        for b in batches[:CALIBRATION_BATCHES]] if data_driven else None)
        model = copy.deepcopy(self.model)
        torch.manual_seed(seed)
        init_start = time.perf_counter()
        start_step = attach_or_resume(model, cfg, run_dir, calibration, log=self.log)
        init_s = time.perf_counter() - init_start
        n_trainable = sum(p_.numel() for _, p_ in trainable_named(model))
        settings = TrainSettings(steps=p.steps, lr=vs.lr, grad_accum=p.grad_accum,
                                 checkpoint_every=p.checkpoint_every)
        result = {"run_id": run_dir.name, "variant": vs.label, "preset": p.name, "model": p.model, "seed": seed,
                  "lr": vs.lr, "default_lr": vs.default_lr, "r": getattr(cfg, "r", None),
                  "alpha": getattr(cfg, "alpha", None), "config": cfg.to_dict(),
                  "targets": list(ll.runtime.adapter_layers(model)), "trainable_params": n_trainable,
                  "calibration_batches": len(calibration or []), "notes": vs.notes, "preset_settings": _jsonable(p),
                  "train_examples": p.steps * p.grad_accum * p.batch_size, "commit": git_commit(),
                  "init_s": init_s}
        try:
            result["train"] = train(model, batches, settings, run_dir, start_step, stop=stop, on_step=on_step)
        except DivergedError as e:
            result.update(status="diverged", error=str(e), wall_time_s=time.perf_counter() - wall)
            if lld.is_main_process():
                atomic_write_bytes(done, json.dumps(result, indent=1).encode())
            self.log(f"{run_dir.name}: {e}")
            return result
        result["adapter_delta"] = adapter_delta(model, run_dir / "adapter_init.safetensors")
        check_training(result)
        result["valid"] = self.score(model, self.valid_rows)
        result["test"] = self.score(model, self.test_rows)
        result["forgetting"] = self.forgetting(model)
        result.update(status="ok", wall_time_s=time.perf_counter() - wall,
                      time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), processes=lld.world_size())
        if lld.is_main_process():
            ll.save(model, run_dir / "adapter.safetensors")
            atomic_write_bytes(done, json.dumps(result, indent=1).encode())
            append_summary(self.opt.output_dir, result, p.metric)
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        lld.barrier()
        return result


def adapter_delta(model, init_path: Path) -> float:
    """Sum over adapter tensors of ||after - init||: zero means training changed nothing."""
    (_, _, init), = ll.io.read_adapter_file(init_path).values()
    total = 0.0
    for name, a in ll.runtime.adapter_layers(model).items():
        for tname in a.tensor_names:
            total += (getattr(a, tname).detach().cpu().float() - init[f"{name}.{tname}"].float()).norm().item()
    return total


def check_training(result: dict) -> None:
    t = result["train"]
    if t["resumed_from_step"] == 0 and not (t["first_grad_norm"] and t["first_grad_norm"] > 0):
        raise LoraLiteError(f"{result['run_id']}: the adapter gradient norm is {t['first_grad_norm']} in the first "
                            "two steps; no gradient reaches the adapter (a zero-gradient init?)")
    if t["base_grad_leaks"]:
        raise LoraLiteError(f"{result['run_id']}: {t['base_grad_leaks']} base parameters received gradients")
    if not result["adapter_delta"] > 0:
        raise LoraLiteError(f"{result['run_id']}: training left the adapter unchanged (adapter_delta=0)")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def _jsonable(preset: Preset) -> dict:
    return json.loads(json.dumps(asdict(preset), default=str))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_LITE_CACHE", Path.home() / ".cache" / "lora-lite"))
