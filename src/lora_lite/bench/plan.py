"""The command line, resolved once: a preset after overrides and one MethodPlan per method (its settings, the
learning rates to try, the seeds). Everything that can be checked without loading a model is checked here, so
a bad value is one line (exit 2) before any work starts; `describe` prints what the session will do and about
how long it takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..cli_args import auto_threads, check_output_dir, parse_knob, split_knob
from ..config import config_class
from ..errors import ConfigError, LoraLiteError
from .presets import OPTION_ROWS, PRESETS, Preset, VariantSettings, lr_grid, split_spec, variant_settings

FULL_SEEDS = (0, 1, 2)
DEFAULT_LR_POINTS, DEFAULT_LR_DECADES, DEFAULT_LR_EXTEND, DEFAULT_RELOAD_TOL = 5, 1.0, 2, 2e-2
PROBE_SIZES = {"steps": 5, "max_new_tokens": 16}
# Preset fields a flag of the same name overrides.
_PRESET_FLAGS = ("model", "train_data", "eval_data", "forget_data", "steps", "batch_size", "grad_accum",
                 "max_seq_length", "max_new_tokens", "batch_size_eval", "max_valid", "max_test", "checkpoint_every",
                 "dtype")
# Flags a probe has no use for: it trains a few steps and checks perturb / save / reload, it scores nothing.
_NOT_IN_PROBE = ("seeds", "lr_sweep", "full", "lr_points", "lr_decades", "lr_extend", "eval_data", "forget_data", "max_valid",
                 "max_test", "max_new_tokens", "batch_size_eval", "checkpoint_every", "overwrite")
_OWN_FLAGS = {"r": "--r", "alpha": "--alpha", "target_names": "--targets"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class MethodPlan:
    variant: str                # the row: a method, or a method with options ("lora:use_rslora=true")
    settings: VariantSettings   # at the table's (or --lr's) learning rate
    lrs: tuple[float, ...]      # the sweep grid, or the one lr
    seeds: tuple[int, ...]
    sweep: bool
    extend: int = 0             # grid steps the sweep may add past either end while the pick sits on it
    decades: float = 0.0        # the grid spans settings.lr·10^(±decades)

    @property
    def n_runs(self) -> int:
        """The runs the plan is sure of; an edge pick adds up to 2 * extend more on the first seed."""
        return len(self.lrs) + len(self.seeds) - 1 if self.sweep else len(self.seeds)


@dataclass(frozen=True)
class Plan:
    mode: str
    preset: Preset
    methods: tuple[MethodPlan, ...]
    device: str
    threads: int | None             # None: leave torch's setting (a GPU run)
    threads_note: str
    output_dir: Path
    cache_dir: Path
    overwrite: bool
    pretrain_steps: int | None
    reload_tol: float
    full: bool

    @property
    def n_runs(self) -> int:
        return sum(m.n_runs for m in self.methods)


def _given(args, name) -> bool:
    value = getattr(args, name)
    return value not in (None, False, [])


def resolve(args) -> Plan:
    """A Plan from parsed arguments, or a ConfigError naming the flag and the fix."""
    import lora_lite as ll

    if args.full and (args.seeds is not None or args.lr_sweep):
        raise ConfigError("--full already means --lr-sweep --seeds 0 1 2; pass those flags instead of --full to "
                          "choose other seeds")
    if args.mode == "probe":
        refused = [f"--{n.replace('_', '-')}" for n in _NOT_IN_PROBE if _given(args, n)]
        if refused:
            raise ConfigError(f"--mode probe trains {PROBE_SIZES['steps']} steps on seed 0 and scores nothing, so "
                              f"{', '.join(refused)} would do nothing; drop them or use --mode benchmark")
    else:
        if args.reload_tol is not None:
            raise ConfigError("--reload-tol is the probe's save/load tolerance; it needs --mode probe")
    sweep = args.lr_sweep or args.full
    if not sweep and (args.lr_points is not None or args.lr_decades is not None or args.lr_extend is not None):
        raise ConfigError("--lr-points / --lr-decades / --lr-extend shape the --lr-sweep grid; add --lr-sweep "
                          "(or --full)")
    seeds = tuple(args.seeds) if args.seeds is not None else (FULL_SEEDS if args.full else (0,))
    if len(set(seeds)) != len(seeds):
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        raise ConfigError(f"--seeds lists {dup} more than once; each seed is one run, give it once")

    preset = _preset(args)
    tiny_base = preset.model == "tiny"
    for flag, given in (("--pretrain-steps", args.pretrain_steps is not None), ("--cache-dir", args.cache_dir)):
        if given and not tiny_base:
            raise ConfigError(f"{flag} is about the tiny preset's pre-trained base; {preset.name} loads "
                              f"{preset.model}")
    _check_sources(preset, args.mode)

    variants = args.variants or [*sorted(ll.REGISTRY), *OPTION_ROWS]
    unknown = [v for v in variants if split_spec(v)[0] not in ll.REGISTRY]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; registered: {', '.join(sorted(ll.REGISTRY))}")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"--variants lists {sorted({v for v in variants if variants.count(v) > 1})} more than once")
    knobs = _knobs(args.set, variants)
    points = args.lr_points if args.lr_points is not None else DEFAULT_LR_POINTS
    decades = args.lr_decades if args.lr_decades is not None else DEFAULT_LR_DECADES
    extend = args.lr_extend if args.lr_extend is not None else DEFAULT_LR_EXTEND
    if sweep and points < 2:
        raise ConfigError(f"--lr-points {points}: a sweep needs at least 2 learning rates")
    methods = []
    for variant in variants:
        try:
            vs = variant_settings(split_spec(variant)[0], preset, lr=args.lr, r=args.r, alpha=args.alpha,
                                  targets=tuple(args.targets) if args.targets else None, knobs=knobs[variant])
        except LoraLiteError as e:
            raise ConfigError(f"{variant}: {e}") from None
        vs = dataclasses.replace(vs, label=variant)
        lrs = tuple(lr_grid(vs.lr, points, decades)) if sweep else (vs.lr,)
        methods.append(MethodPlan(variant, vs, lrs, seeds if args.mode == "benchmark" else (0,), sweep,
                                  extend if sweep else 0, decades))

    device = _device(args.device)
    if device == "cpu":
        threads, note = (auto_threads() if args.threads == "auto" else (args.threads, "--threads"))
    else:
        if args.threads != "auto":
            raise ConfigError(f"--threads sets torch's CPU threads; this session runs on {device}")
        threads, note = None, f"{device}: torch's CPU threads unchanged"
    out = check_output_dir(args.output_dir or Path("outputs") / "bench" / preset.name, "--output-dir")
    from .run import default_cache_dir
    cache = check_output_dir(args.cache_dir or default_cache_dir(), "--cache-dir") if tiny_base else Path(".")
    return Plan(mode=args.mode, preset=preset, methods=tuple(methods), device=device, threads=threads,
                threads_note=note, output_dir=out, cache_dir=cache, overwrite=args.overwrite,
                pretrain_steps=args.pretrain_steps,
                reload_tol=args.reload_tol if args.reload_tol is not None else DEFAULT_RELOAD_TOL, full=args.full)


def _preset(args) -> Preset:
    overrides = {k: getattr(args, k) for k in _PRESET_FLAGS if getattr(args, k) is not None}
    if args.mode == "probe":
        overrides = {**PROBE_SIZES, **overrides}
    preset = dataclasses.replace(PRESETS[args.preset], **overrides)
    if args.checkpoint_every and args.checkpoint_every >= preset.steps:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every} is not below the {preset.steps} steps: no "
                          "checkpoint would ever be written; lower it, or 0 for checkpoints on Ctrl-C/SIGTERM only")
    return preset


def _knobs(items: list[str], variants: list[str]) -> dict[str, dict]:
    """--set KEY=VALUE, typed per selected row (a key applies to the rows whose method's config has it), then
    each row's own options ("lora:use_rslora=true"), which win over --set for that row."""
    out: dict[str, dict] = {v: {} for v in variants}
    for item in items:
        key, raw = split_knob(item, "--set")
        if key in _OWN_FLAGS:
            raise ConfigError(f"--set {item}: {key} has its own flag, {_OWN_FLAGS[key]}")
        takers = [v for v in variants if key in {f.name for f in dataclasses.fields(config_class(split_spec(v)[0]))}]
        if not takers:
            raise ConfigError(f"--set {item}: no selected variant has a config field {key!r} "
                              f"(selected: {', '.join(variants)})")
        for v in takers:
            out[v][key] = parse_knob(config_class(split_spec(v)[0]), key, raw, f"--set {item}")
    for v in variants:
        name, options = split_spec(v)
        for item in options:
            key, raw = split_knob(item, f"variant spec {v!r}")
            if key in _OWN_FLAGS:
                raise ConfigError(f"variant spec {v!r}: {key} has its own flag, {_OWN_FLAGS[key]}")
            out[v][key] = parse_knob(config_class(name), key, raw, f"variant spec {v!r}")
    return out


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} but CUDA is not available here; pass --device cpu (or auto)")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return spec


# ---- where models and data come from -------------------------------------------------------------------------
_SOURCE_FLAGS = {"model": "--model DIR", "train_data": "--train-data FILE.jsonl",
                 "eval_data": "--eval-data DIR (holding train.jsonl and test.jsonl)",
                 "forget_data": "--forget-data FILE.jsonl (one {\"text\": ...} per line)"}


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith((".jsonl", ".json")) or os.sep * 2 in source


def _check_sources(preset: Preset, mode: str) -> None:
    missing, uncached = [], []
    for field, source in hub_sources(preset, mode):
        if _looks_like_path(source) or not _HUB_ID.fullmatch(source):
            missing.append(f"{_SOURCE_FLAGS[field].split()[0]} {source}: no such file or folder")
        elif offline() and not _in_hub_cache(source, dataset=field != "model"):
            uncached.append((field, source))
    if missing:
        raise ConfigError("; ".join(missing))
    if uncached:
        names = ", ".join(s for _, s in uncached)
        flags = " ".join(_SOURCE_FLAGS[f] for f, _ in uncached)
        raise ConfigError(f"preset {preset.name} reads {names} from the Hugging Face hub, but this machine is "
                          f"offline ({offline()}=1) and they are not in the local cache. Pass local copies: {flags}")


def hub_sources(preset: Preset, mode: str = "benchmark") -> list[tuple[str, str]]:
    """(preset field, hub id) for every model or data source of the preset that is not a local path."""
    needed = {"model": preset.model, "train_data": preset.train_data}
    if mode == "benchmark":
        needed["eval_data"] = preset.eval_data
        if preset.forget_data != "self":
            needed["forget_data"] = preset.forget_data.partition(":")[0]
    return [(f, s) for f, s in needed.items() if s != "tiny" and not is_local(s)]


def offline_hint(preset: Preset, mode: str = "benchmark") -> str:
    """What to pass to run this preset without the hub."""
    remote = hub_sources(preset, mode)
    if not remote:
        return ""
    return (f" Preset {preset.name} reads {', '.join(s for _, s in remote)} from the Hugging Face hub; without it, "
            f"pass local copies: {' '.join(_SOURCE_FLAGS[f] for f, _ in remote)}")


def offline() -> str | None:
    """The name of the environment variable that puts the hub libraries offline, if one does."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")), None)


def _in_hub_cache(repo: str, dataset: bool) -> bool:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                      "huggingface")) / "hub")
    kind = "datasets" if dataset else "models"
    if (hub / f"{kind}--{repo.replace('/', '--')}").is_dir():
        return True
    if dataset:  # the datasets library's own cache of prepared splits
        home = Path(os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                                "huggingface")) / "datasets")
        return (home / repo.replace("/", "___")).is_dir()
    return False


# ---- what the session will do ----------------------------------------------------------------------------------
def run_seconds(plan: Plan) -> float | None:
    """Expected seconds of one run (the mean over methods), from the preset's reference timing on 2 CPU cores,
    scaled by the training examples and the generated tokens; None when the reference does not apply."""
    p, ref = plan.preset, plan.preset.timing
    default = PRESETS[p.name]
    if ref is None or plan.device != "cpu" or p.model != default.model:
        return None
    train = ref.train_s * (p.steps * p.batch_size * p.grad_accum) / (default.steps * default.batch_size *
                                                                     default.grad_accum)
    if plan.mode == "probe":
        return train
    n_eval = (p.max_valid + (p.max_test or 0)) * p.max_new_tokens
    n_eval_default = (default.max_valid + (default.max_test or 0)) * default.max_new_tokens
    return train + ref.eval_s * n_eval / max(n_eval_default, 1)


def session_seconds(plan: Plan, base_cached: bool) -> float | None:
    per_run = run_seconds(plan)
    if per_run is None:
        return None
    ref = plan.preset.timing
    pretrain = 0.0 if base_cached else ref.pretrain_s * (plan.pretrain_steps or 800) / 800
    return pretrain + ref.session_s + per_run * plan.n_runs


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, math.ceil(seconds / 5) * 5):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def full_table_runs(n_methods: int, points: int = DEFAULT_LR_POINTS, seeds: int = len(FULL_SEEDS)) -> int:
    return n_methods * (points + seeds - 1)


def describe(plan: Plan, base_cached: bool) -> str:
    p = plan.preset
    n = len(plan.methods)
    lines = []
    if plan.mode == "probe":
        lines.append(f"probe: {n} method(s) x {p.steps} steps on {p.model}: perturb, train, save, reload")
    else:
        if plan.methods and plan.methods[0].sweep:
            m = plan.methods[0]
            how = (f"lr sweep of {len(m.lrs)} on seed {m.seeds[0]}, then seeds {' '.join(map(str, m.seeds[1:]))} "
                   "at the lr that wins on valid" if len(m.seeds) > 1 else f"lr sweep of {len(m.lrs)} on seed "
                   f"{m.seeds[0]}")
        else:
            how = f"seeds {' '.join(map(str, plan.methods[0].seeds))} at each method's table lr" if n else ""
        lines.append(f"bench {p.name}: {n} method(s), {how}: {plan.n_runs} runs")
        if plan.methods and plan.methods[0].sweep and plan.methods[0].extend:
            k = plan.methods[0].extend
            lines.append(f"  a pick on the grid's lowest or highest lr tries up to {k} more grid step(s) past it "
                         f"(--lr-extend): up to {2 * k} more run(s) per method on seed {plan.methods[0].seeds[0]}")
        test = f"the first {p.max_test}" if p.max_test else "all"
        lines.append(f"  each run: {p.steps} steps x batch {p.batch_size * p.grad_accum}, then scored on {p.max_valid} "
                     f"valid and {test} test questions (greedy, up to {p.max_new_tokens} new tokens)"
                     + (", answer NLL" if p.metric == "nll" else "") + ", and forgetting")
    dtypes = sorted({str(m.settings.cfg.dtype).removeprefix("torch.") if m.settings.cfg.dtype else "fp32 master"
                     for m in plan.methods})
    lines.append(f"  model {p.model} ({p.dtype}, adapter tensors {', '.join(dtypes) or '-'}) on "
                 f"{plan.device}, " + (f"{plan.threads} torch thread(s) ({plan.threads_note})" if plan.threads
                                       else plan.threads_note) + f"; output {plan.output_dir}")
    total = session_seconds(plan, base_cached)
    if total is None:
        lines.append("  expected time: no reference timing for this model/device; the ETA follows the first run")
    else:
        pre = "" if base_cached or p.model != "tiny" else ", the base's one-off pre-training included"
        lines.append(f"  expected time: about {duration(total)} on 2 CPU cores at the preset's reference pace{pre}; a "
                     "busy machine is slower, and the ETA after each run follows the real pace")
    if plan.mode == "benchmark" and not plan.full:
        import lora_lite as ll
        runs = full_table_runs(len(ll.REGISTRY) + len(OPTION_ROWS))
        per_run = run_seconds(plan)
        eta = f", about {duration(per_run * runs)} on 2 CPU cores" if per_run else ""
        flag = "" if p.name == "tiny" else f" --preset {p.name}"
        lines.append(f"  the full table (every method and option row, lr sweep, 3 seeds: {runs} runs): lora-lite bench{flag} "
                     f"--full{eta}")
    return "\n".join(lines)
