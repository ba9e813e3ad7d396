"""`lora-lite bench`: train and score every registered variant, then write results.md and a params plot.

    lora-lite bench                                   # tiny preset, every variant, seed 0 (no download)
    lora-lite bench --preset stories --seeds 0 1 2    # stories260K on GSM8K, mean ± 95% CI over 3 seeds
    lora-lite bench --variants lora dora --lr-sweep   # pick each variant's lr on valid, report test there
    lora-lite bench --preset qwen --device cuda       # the prototype's real run (GPU)
    lora-lite bench --mode probe --variants lora      # quick train / perturb / save / reload proof
    torchrun --nproc_per_node 2 -m lora_lite.cli bench --variants lora   # DDP: each rank trains on a shard of
                                                      # every batch and scores a slice of each eval set; rank 0 writes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from .. import distributed as lld
from ..errors import ConfigError, LoraLiteError
from .presets import OPTION_ROWS, PRESETS, lr_grid, parse_knobs, split_spec, variant_settings
from .train import Interrupted, StopFlag


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lora-lite bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="tiny: embedded model and task, CPU, no download (default); stories: stories260K on "
                         "GSM8K from ../shared; qwen: Qwen3.5-0.8B-Base on MetaMathQA -> GSM8K (GPU)")
    ap.add_argument("--mode", choices=("benchmark", "probe"), default="benchmark",
                    help="probe: a few steps, then check that a perturbed adapter moves the logits and that "
                         "save/load reproduces the trained model")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="variant names, or 'name:field=value,...' for a row with options (default: every "
                         "registered one, plus " + ", ".join(OPTION_ROWS) + ")")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds; ≥2 gives 95%% CIs")
    ap.add_argument("--lr-sweep", action="store_true",
                    help="run a log-spaced lr grid around each variant's default lr (first seed), pick the best "
                         "on valid, then run the other seeds there")
    ap.add_argument("--lr-points", type=int, default=5, help="lr grid size for --lr-sweep")
    ap.add_argument("--lr-decades", type=float, default=1.0, help="grid spans default·10^(±this) decades")
    g = ap.add_argument_group("overrides (default: the preset's / the variant table's value)")
    g.add_argument("--model", help="hub id or local model dir")
    g.add_argument("--train-data", help="hub dataset id, .jsonl, or folder with train.jsonl")
    g.add_argument("--eval-data", help="GSM8K-style hub id or folder with train.jsonl and test.jsonl")
    g.add_argument("--forget-data", help="'self' (base-generated text), .jsonl with 'text', or hub id[:config]")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="micro-batch size")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--max-seq-length", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--batch-size-eval", type=int)
    g.add_argument("--max-valid", type=int, help="validation questions (default 50)")
    g.add_argument("--max-test", type=int, help="first N test questions (default: the preset's)")
    g.add_argument("--checkpoint-every", type=int, help="write a resumable checkpoint every N steps (0: only "
                                                          "on Ctrl-C)")
    g.add_argument("--lr", type=float, help="learning rate for every selected variant")
    g.add_argument("--r", type=int, help="rank for every selected variant (alpha follows the table's alpha/r)")
    g.add_argument("--alpha", type=float)
    g.add_argument("--targets", nargs="+", help="target regexes, e.g. 'down_proj$'")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="variant config knobs, e.g. lambda0=0.1 group_size=32 (applied where the field exists)")
    g.add_argument("--pretrain-steps", type=int, help="tiny preset: pre-training steps of the base (cached)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", help="model dtype (float32, bfloat16)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (use 1 on a busy machine)")
    ap.add_argument("--output-dir", type=Path, help="default: outputs/bench/<preset>")
    ap.add_argument("--cache-dir", type=Path, help="tiny base cache (default ~/.cache/lora-lite or "
                                                   "$LORA_LITE_CACHE)")
    ap.add_argument("--overwrite", action="store_true", help="rerun runs that already have a result.json")
    ap.add_argument("--reload-tol", type=float, default=2e-2, help="probe: max |Δlogit| after save/load")
    return ap


def preset_from_args(args):
    fields = {f.name for f in dataclasses.fields(PRESETS[args.preset])}
    overrides = {k: v for k, v in vars(args).items() if k in fields and k not in ("name", "targets") and v is not None}
    if args.mode == "probe":
        overrides.setdefault("steps", 5)
        overrides.setdefault("max_test", 10)
        overrides.setdefault("max_valid", 10)
        overrides.setdefault("max_new_tokens", 16)
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lld.init_from_env()  # under torchrun / accelerate launch; a no-op in one process
    quiet = contextlib.nullcontext() if lld.is_main_process() else contextlib.redirect_stdout(open(os.devnull, "w"))
    try:
        with quiet:  # rank 0 reports for everyone
            return _main(args)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except LoraLiteError as e:
        print(f"lora-lite bench: {e}", file=sys.stderr)
        return 1
    finally:
        if lld.is_distributed():
            import torch.distributed as dist
            dist.destroy_process_group()


def _main(args) -> int:
    import torch

    import lora_lite as ll

    from . import probe as probe_mod
    from .report import write_report
    from .run import Bench, Options, default_cache_dir

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available; pass --device cpu")
    if args.device == "cuda" and lld.is_distributed():
        args.device = str(lld.device())  # one GPU per rank: cuda:LOCAL_RANK
    preset = preset_from_args(args)
    if lld.world_size() > 1 and (args.mode == "probe" or preset.batch_size % lld.world_size()):
        raise ConfigError(f"{lld.world_size()} processes need --mode benchmark and a --batch-size divisible by "
                          f"{lld.world_size()} (each rank trains on a shard of every micro-batch); got --mode "
                          f"{args.mode}, batch size {preset.batch_size}")
    variants = args.variants or [*sorted(ll.REGISTRY), *OPTION_ROWS]
    unknown = [v for v in variants if split_spec(v)[0] not in ll.REGISTRY]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; registered: {sorted(ll.REGISTRY)}")
    _check_knobs(args.set, [split_spec(v)[0] for v in variants])
    for spec in variants:
        name, items = split_spec(spec)
        _check_knobs(items, [name])
    out = args.output_dir or Path("outputs") / "bench" / preset.name
    opt = Options(preset=preset, output_dir=Path(out), cache_dir=args.cache_dir or default_cache_dir(),
                  device=args.device, pretrain_steps=args.pretrain_steps, overwrite=args.overwrite)
    bench = Bench(opt)
    stop = StopFlag()
    previous = stop.install_sigint()
    try:
        if args.mode == "probe":
            return probe_mod.run_probes(bench, variants, args, stop)
        base = bench.base_result()
        runs = []
        for variant in variants:
            runs += _run_variant(bench, variant, args, stop)
    finally:
        import signal
        signal.signal(signal.SIGINT, previous)
    if not lld.is_main_process():
        return 0
    title = f"{preset.name}: {bench.model_tag}, {preset.steps} steps x {preset.batch_size * preset.grad_accum}"
    table, png = write_report(opt.output_dir, base, runs, preset.metric, title)
    print("\n" + table)
    print(f"results: {opt.output_dir / 'results.md'}  plot: {png}  runs: {opt.output_dir / 'summary.tsv'}")
    return 0


def _settings(args, spec, preset, lr=None):
    variant, options = split_spec(spec)
    vs = variant_settings(variant, preset, lr=lr if lr is not None else args.lr, r=args.r, alpha=args.alpha,
                          targets=tuple(args.targets) if args.targets else None,
                          knobs=parse_knobs([*args.set, *options], variant))
    vs.label = spec
    return vs


def _run_variant(bench, variant, args, stop) -> list[dict]:
    vs = _settings(args, variant, bench.p)
    for note in vs.notes:
        print(f"note: {note}")
    runs = []
    if args.lr_sweep:
        grid = lr_grid(vs.lr, args.lr_points, args.lr_decades)
        for lr in grid:
            runs.append(_one(bench, _settings(args, variant, bench.p, lr), args.seeds[0], stop))
        from .report import pick_lr
        best = pick_lr(runs, bench.p.metric)
        print(f"{variant}: lr grid {grid} -> best on valid {best:g}")
        vs = _settings(args, variant, bench.p, best)
        seeds = args.seeds[1:]
    else:
        seeds = args.seeds
    for seed in seeds:
        runs.append(_one(bench, vs, seed, stop))
    return runs


def _one(bench, vs, seed, stop) -> dict:
    r = bench.run(vs, seed, stop=stop)
    if r["status"] == "ok":
        key = "acc" if bench.p.metric == "em" else "nll"
        print(f"{r['run_id']}: test {key} {r['test'][key]:.4g} valid {r['valid'][key]:.4g} "
              f"params {r['trainable_params']:,} forgetting {r['forgetting']:+.4f} ({r['wall_time_s']:.0f}s)")
    return r


def _check_knobs(items, variants):
    from ..config import config_class
    for item in items:
        key = item.partition("=")[0]
        if not any(key in {f.name for f in dataclasses.fields(config_class(v))} for v in variants):
            raise ConfigError(f"--set {key}: no selected variant has a config field {key!r}")
