"""`lora-lite bench`: train and score registered variants, then write results.md, results.json and a params plot.

    lora-lite bench                                   # tiny preset, every variant, seed 0 (no download)
    lora-lite bench --full                            # the published table: lr sweep on seed 0, seeds 0 1 2
    lora-lite bench --preset stories --full           # stories260K on GSM8K from ../shared, same protocol
    lora-lite bench --variants lora dora --lr-sweep   # pick each variant's lr on valid, report test there
    lora-lite bench --preset qwen                     # Qwen3.5-0.8B-Base on MetaMathQA -> GSM8K (GPU)
    lora-lite bench --mode probe --variants lora      # quick train / perturb / save / reload proof
    lora-lite bench --plan-only ...                   # print what a session would do and its ETA, then stop
    torchrun --nproc_per_node 2 -m lora_lite.cli bench --variants lora   # DDP: each rank trains on a shard of
                                                      # every batch and scores a slice of each eval set; rank 0 writes

Every session prints its plan (methods x lrs x seeds, sizes, device, an ETA) before it starts. Bad values are
refused in one line (exit 2) before any work; a failed run is reported and the session goes on (exit 1 at the
end); Ctrl-C or SIGTERM writes a checkpoint (exit 130 / 143) that the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .. import distributed as lld
from ..cli_args import CliParser, nonnegative_int, positive_float, positive_int, threads, usage_error
from ..errors import LoraLiteError
from .presets import OPTION_ROWS, PRESETS
from .train import Interrupted

PROG = "lora-lite bench"


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="tiny: embedded model and task, CPU, no download (default); stories: stories260K on "
                         "GSM8K from ../shared; qwen: Qwen3.5-0.8B-Base on MetaMathQA -> GSM8K (GPU)")
    ap.add_argument("--mode", choices=("benchmark", "probe"), default="benchmark",
                    help="probe: a few steps, then check that a perturbed adapter moves the logits and that "
                         "save/load reproduces the trained model")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="variant names, or 'name:field=value,...' for a row with options (default: every "
                         "registered one, plus " + ", ".join(OPTION_ROWS) + ")")
    ap.add_argument("--full", action="store_true",
                    help="the published table: --lr-sweep --seeds 0 1 2 (every variant unless --variants)")
    ap.add_argument("--seeds", nargs="+", type=nonnegative_int, default=None,
                    help="training seeds (default 0); >= 2 gives 95%% CIs and the two-level test")
    ap.add_argument("--lr-sweep", action="store_true",
                    help="run a log-spaced lr grid around each variant's lr on the first seed, pick the best on "
                         "valid, then run the other seeds there")
    ap.add_argument("--lr-points", type=positive_int, default=None, help="lr grid size for --lr-sweep (default 5)")
    ap.add_argument("--lr-decades", type=positive_float, default=None,
                    help="the grid spans lr·10^(±this) (default 1)")
    ap.add_argument("--lr-extend", type=nonnegative_int, default=None,
                    help="grid steps a sweep may add past its lowest or highest lr while the pick sits there, "
                         "per side (default 2; 0 keeps the grid as it is)")
    g = ap.add_argument_group("overrides (default: the preset's / the variant table's value)")
    g.add_argument("--model", help="hub id or local model folder")
    g.add_argument("--train-data", help="hub dataset id, .jsonl, or folder with train.jsonl")
    g.add_argument("--eval-data", help="GSM8K-style hub id or folder with train.jsonl and test.jsonl")
    g.add_argument("--forget-data", help="'self' (base-generated text), .jsonl with 'text', or hub id[:config]")
    g.add_argument("--steps", type=positive_int, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, help="micro-batch size")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    g.add_argument("--max-seq-length", type=positive_int, help="longer examples are left out and counted")
    g.add_argument("--max-new-tokens", type=positive_int)
    g.add_argument("--batch-size-eval", type=positive_int)
    g.add_argument("--max-valid", type=positive_int, help="validation questions (default 50)")
    g.add_argument("--max-test", type=positive_int, help="first N test questions that fit (default: the preset's)")
    g.add_argument("--checkpoint-every", type=nonnegative_int,
                   help="write a resumable checkpoint every N steps (0: only on Ctrl-C / SIGTERM)")
    g.add_argument("--lr", type=positive_float, help="learning rate for every selected variant (the sweep's center)")
    g.add_argument("--r", type=positive_int, help="rank for every selected variant (alpha follows the table's alpha/r)")
    g.add_argument("--alpha", type=positive_float)
    g.add_argument("--targets", nargs="+", help="target regexes, e.g. 'down_proj$'")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="variant config fields, e.g. lambda0=0.1 group_size=32 dtype=bfloat16 (applied to the "
                        "selected variants that have the field; typed by the field)")
    g.add_argument("--pretrain-steps", type=positive_int, help="tiny preset: pre-training steps of the base (cached)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu; default), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="the base model's dtype (adapters stay float32 unless --set dtype=...)")
    ap.add_argument("--threads", type=threads, default="auto",
                    help="torch CPU threads; auto (default) uses the cores the load average leaves free")
    ap.add_argument("--output-dir", type=Path, help="default: outputs/bench/<preset>")
    ap.add_argument("--cache-dir", type=Path, help="tiny base cache (default ~/.cache/lora-lite or "
                                                   "$LORA_LITE_CACHE)")
    ap.add_argument("--overwrite", action="store_true", help="rerun runs that already have a result.json")
    ap.add_argument("--reload-tol", type=positive_float, default=None,
                    help="probe: max |Δlogit| after save/load (default 0.02)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and its ETA, and stop")
    return ap


def main(argv: list[str] | None = None) -> int:
    from .plan import resolve

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = resolve(args)
    except LoraLiteError as e:
        return usage_error(PROG, e)
    lld.init_from_env()  # under torchrun / accelerate launch; a no-op in one process
    try:
        if lld.world_size() > 1:
            try:
                plan = _per_rank(plan)
            except LoraLiteError as e:
                return usage_error(PROG, e)
        quiet = contextlib.nullcontext() if lld.is_main_process() else contextlib.redirect_stdout(open(os.devnull, "w"))
        with quiet:  # rank 0 reports for everyone
            from .session import run_session
            return run_session(plan, argv, args.plan_only)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    except LoraLiteError as e:
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if lld.is_distributed():
            import torch.distributed as dist
            dist.destroy_process_group()


def _per_rank(plan):
    """Several processes: one GPU per rank, and checks that need the world size."""
    import dataclasses

    from ..errors import ConfigError

    world = lld.world_size()
    if plan.mode == "probe" or plan.preset.batch_size % world:
        raise ConfigError(f"{world} processes need --mode benchmark and a --batch-size divisible by {world} (each "
                          f"rank trains on a shard of every micro-batch); got --mode {plan.mode}, batch size "
                          f"{plan.preset.batch_size}")
    if plan.device.startswith("cuda"):
        plan = dataclasses.replace(plan, device=str(lld.device()))
    return plan
