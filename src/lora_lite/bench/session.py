"""Run a resolved Plan: print it, load once, score the base, run every method (sweep, pick, seeds), report.

Every long step names its method and phase ([k/N] method lr seed: phase); after each fresh run the remaining
time is re-estimated from the pace so far. A run that fails (a bad setting for one method, a damaged
checkpoint) is reported and the session goes on; the report lists it and the exit status is 1.
"""

from __future__ import annotations

import sys
import time

from ..errors import LoraLiteError
from .plan import Plan, describe, duration
from .presets import lr_grid_point
from .report import pick_lr, write_report
from .train import Interrupted, StopFlag


class Pace:
    """Counts runs and estimates the time left from the runs that actually trained."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.fresh_s, self.fresh = total, 0, 0.0, 0
        self.start = time.perf_counter()

    def label(self, variant: str, lr: float, seed: int) -> str:
        return f"[{self.done + 1}/{self.total}] {variant} lr {lr:g} seed {seed}"

    def finished(self, seconds: float, reused: bool) -> str:
        self.done += 1
        if not reused:
            self.fresh += 1
            self.fresh_s += seconds
        left = self.total - self.done
        elapsed = duration(time.perf_counter() - self.start)
        if not left:
            return f"all {self.total} runs done ({elapsed})"
        if not self.fresh:
            return f"{left} run(s) left"
        return f"{left} run(s) left, about {duration(left * self.fresh_s / self.fresh)} at this pace ({elapsed} so far)"


def _line(text: str) -> None:
    print(text, flush=True)


def run_session(plan: Plan, argv: list[str], plan_only: bool = False) -> int:
    import torch

    from .. import distributed as lld
    from .run import Bench, Options

    base_cached = True
    if plan.preset.model == "tiny":
        from . import tiny
        spec = tiny.TinySpec(**({"pretrain_steps": plan.pretrain_steps} if plan.pretrain_steps else {}))
        base_cached = tiny.cached(spec, plan.cache_dir)
    _line(describe(plan, base_cached))
    if plan_only:
        return 0
    previous_threads = torch.get_num_threads()
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    stop = StopFlag()
    previous_handlers = stop.install()
    try:
        bench = Bench(Options(preset=plan.preset, output_dir=plan.output_dir, cache_dir=plan.cache_dir,
                              device=plan.device, pretrain_steps=plan.pretrain_steps, overwrite=plan.overwrite,
                              threads=plan.threads, mode=plan.mode), log=_line)
        if plan.mode == "probe":
            from .probe import run_probes
            return run_probes(bench, plan.methods, stop, plan.reload_tol)
        base = bench.base_result()
        runs, picks, failures = _run_methods(bench, plan, stop)
    finally:
        StopFlag.restore(previous_handlers)
        torch.set_num_threads(previous_threads)
    if not lld.is_main_process():
        return 0
    p = plan.preset
    title = f"{p.name}: {bench.model_tag}, {p.steps} steps x batch {p.batch_size * p.grad_accum}"
    env = bench.env
    context = [
        f"Command: `lora-lite bench {' '.join(argv)}`. Test: {len(bench.test_rows)} questions, valid: "
        f"{len(bench.valid_rows)} (examples longer than {p.max_seq_length} tokens left out: "
        f"{bench.data_report['test']['too_long']} test, {bench.data_report['valid']['too_long']} valid); greedy "
        f"decoding up to {p.max_new_tokens} new tokens. "
        + ("Learning rate: swept on seed " + str(plan.methods[0].seeds[0]) + ", picked on valid"
           + (f"; a pick on the grid's lowest or highest lr tried up to {plan.methods[0].extend} more step(s) "
              "past it" if plan.methods[0].extend else "") + "."
           if plan.methods and plan.methods[0].sweep else "Learning rate: each method's table lr."),
        f"Environment: torch {env['torch']}, transformers {env['transformers']}, {env['device_name']} "
        f"({plan.device}, {env['torch_threads']} torch thread(s)), lora-lite {env['commit'][:12]}"
        + (" with uncommitted changes" if env["dirty"] else "") + ".",
    ]
    meta = {"command": ["lora-lite", "bench", *argv], "environment": env, "eval_settings": bench.eval_settings(),
            "data": bench.data_report, "picks": picks, "failures": failures}
    table, png = write_report(plan.output_dir, base, runs, p.metric, title, picks, context, meta)
    _line("\n" + table)
    if failures:
        lines = [f"- {f['variant']} lr {f['lr']:g} seed {f['seed']}: {f['error']}" for f in failures]
        with open(plan.output_dir / "results.md", "a") as f:
            f.write("\n**Failed runs** (no result; rerun the command to retry them):\n\n" + "\n".join(lines) + "\n")
        print(f"{len(failures)} run(s) failed:\n" + "\n".join(lines), file=sys.stderr)
    _line(f"results: {plan.output_dir / 'results.md'}  plot: {png}  runs: {plan.output_dir / 'summary.tsv'}")
    return 1 if failures else 0


def _run_methods(bench, plan: Plan, stop: StopFlag):
    pace = Pace(plan.n_runs)
    runs, picks, failures = [], {}, []

    def one(method, lr, seed):
        label = pace.label(method.variant, lr, seed)
        _line(f"{label}: start")
        start = time.perf_counter()
        try:
            result = bench.run(method.settings.at_lr(lr), seed, stop=stop, label=label)
        except Interrupted:
            raise
        except LoraLiteError as e:
            failures.append({"variant": method.variant, "lr": lr, "seed": seed,
                             "error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
            print(f"{label}: FAILED: {failures[-1]['error']}", file=sys.stderr, flush=True)
            _line(f"{label}: {pace.finished(time.perf_counter() - start, reused=False)}")
            return None
        reused = bench.reused
        if result["status"] == "ok":
            key = "acc" if plan.preset.metric == "em" else "nll"
            _line(f"{label}: test {key} {result['test'][key]:.4g}, valid {result['valid'][key]:.4g}, params "
                  f"{result['trainable_params']:,}, forgetting {result['forgetting']:+.4f} "
                  f"({result['wall_time_s']:.0f} s)")
        _line(f"{label}: {pace.finished(time.perf_counter() - start, reused)}")
        runs.append(result)
        return result

    for method in plan.methods:
        for note in method.settings.notes:
            _line(f"note: {note}")
        if method.sweep:
            sweep = [r for r in (one(method, lr, method.seeds[0]) for lr in method.lrs) if r is not None]
            best, grid = _extend_past_edges(method, sweep, one, pace, plan.preset.metric)
            picks[method.variant] = best
            if best is None:
                _line(f"{method.variant}: no lr of {list(method.lrs)} gave a finished run on seed "
                      f"{method.seeds[0]}; its other seeds are skipped")
                pace.total -= len(method.seeds) - 1
                continue
            _line(f"{method.variant}: lr grid {grid} -> best on valid {best:g}")
            seeds = method.seeds[1:]
        else:
            best = method.lrs[0]
            picks[method.variant] = best
            seeds = method.seeds
        for seed in seeds:
            one(method, best, seed)
    return runs, picks, failures


def _extend_past_edges(method, sweep: list[dict], one, pace: Pace,
                       metric: str) -> tuple[float | None, list[float]]:
    """The sweep's pick and every lr it tried, after stepping past the grid's ends: while the best lr is the
    lowest or the highest one tried, the optimum may lie outside the grid, so the next log step beyond it runs
    on the sweep's seed, up to `method.extend` steps per side. A diverged or failed step ends that side (it
    brackets the optimum). Appends the new runs to `sweep`."""
    n = len(method.lrs)
    tried, steps = set(method.lrs), {1: 0, -1: 0}
    while True:
        best = pick_lr(sweep, metric)
        if best is None:
            return None, sorted(tried)
        side = 1 if best == max(tried) else -1 if best == min(tried) else 0
        if not side or steps[side] >= method.extend:
            return best, sorted(tried)
        steps[side] += 1
        lr = lr_grid_point(method.settings.lr, n, method.decades, n - 1 + steps[1] if side > 0 else -steps[-1])
        pace.total += 1
        _line(f"{method.variant}: best lr {best:g} is the grid's {'highest' if side > 0 else 'lowest'}; "
              f"trying {lr:g} past it")
        tried.add(lr)
        result = one(method, lr, method.seeds[0])
        if result is not None:
            sweep.append(result)
