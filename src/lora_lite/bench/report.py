"""Outputs: summary.tsv (one row per run, appended under a file lock), and per session results.md (the table),
results.json (every row with its per-seed values, the picks, the settings and the environment), scores.json
(every reported run's per-question scores, enough to recompute each p) and the params plot.

Each method is reported at one learning rate: the one the sweep picked on valid (`pick_lr`: lrs are compared
on the seeds they all have, so later seeds at the winner cannot change the pick), or its only lr. Its row
gives test and valid as mean ± 95% CI over seeds and the difference from LoRA on the same test questions:
with >= 2 seeds on both sides the two-level t-test of stats.py (seeds, then questions); with one seed,
McNemar (exact match) or a paired bootstrap over questions (NLL), which cannot see training noise and say so.
A method whose every run diverged gets a row that says so instead of numbers.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_bytes
from .stats import mcnemar, mean_ci, paired_bootstrap, seed_question_t

SUMMARY_COLUMNS = ("run_id", "variant", "preset", "model", "seed", "lr", "r", "steps", "metric", "test", "valid",
                   "test_acc", "valid_acc", "trainable_params", "forgetting", "train_time_s", "wall_time_s",
                   "status", "commit", "dirty", "settings_key", "time_utc", "result_json")
TWO_LEVEL, MCNEMAR, BOOTSTRAP = "t (seeds+questions)", "McNemar, 1 seed", "bootstrap, 1 seed"


def metric_key(metric: str) -> str:
    return {"em": "acc", "nll": "nll"}[metric]


def _summary_row(output_dir: Path, result: dict, metric: str) -> dict:
    key, ok = metric_key(metric), result["status"] == "ok"
    env = result.get("environment", {})

    def fmt(split, k, spec):
        return format(result[split][k], spec) if ok else "–"

    return {"run_id": result["run_id"], "variant": result["variant"], "preset": result["preset"],
            "model": result["model"], "seed": result["seed"], "lr": f"{result['lr']:g}", "r": result["r"],
            "steps": result["preset_settings"]["steps"], "metric": key, "test": fmt("test", key, ".4f"),
            "valid": fmt("valid", key, ".4f"), "test_acc": fmt("test", "acc", ".2f"),
            "valid_acc": fmt("valid", "acc", ".2f"), "trainable_params": result["trainable_params"],
            "forgetting": f"{result['forgetting']:.4f}" if ok else "–",
            "train_time_s": f"{result['train']['train_time_s']:.1f}" if ok else "–",
            "wall_time_s": f"{result['wall_time_s']:.1f}", "status": result["status"],
            "commit": result["commit"][:12], "dirty": env.get("dirty"), "settings_key": result.get("settings_key"),
            "time_utc": result["time_utc"], "result_json": str(Path(output_dir) / result["run_id"] / "result.json")}


def append_summary(output_dir: Path, result: dict, metric: str) -> None:
    """Add the run's row to output_dir/summary.tsv unless it is there, under an exclusive lock on
    summary.tsv.lock. Called again when a finished run is reused, so a row lost to a kill between result.json
    and this call comes back. A file whose header differs (older column set) is renamed to summary.<UTC>.tsv.bak.
    """
    import fcntl

    row = _summary_row(output_dir, result, metric)
    path = Path(output_dir) / "summary.tsv"
    header = "\t".join(SUMMARY_COLUMNS) + "\n"
    line = "\t".join(str(row[c]).replace("\t", " ").replace("\n", " ") for c in SUMMARY_COLUMNS) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tsv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                with open(path) as f:
                    lines = f.readlines()
                if not lines or lines[0] != header:
                    path.rename(path.with_name(f"summary.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tsv.bak"))
                elif any(existing.split("\t", 1)[0] == row["run_id"] for existing in lines[1:]):
                    return
            new = not path.exists()
            with open(path, "a") as f:
                f.write((header if new else "") + line)
                f.flush()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pick_lr(runs: list[dict], metric: str) -> float | None:
    """The lr whose finished runs have the best mean valid score (higher acc / lower nll), compared on the seeds
    every candidate lr has, so the extra seeds a sweep runs at its winner cannot hand the pick to another lr.
    Ties go to the smaller lr. None when every run diverged."""
    key, sign = metric_key(metric), (1 if metric == "em" else -1)
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return None
    by_lr = defaultdict(dict)
    for r in ok:
        by_lr[r["lr"]][r["seed"]] = r["valid"][key]
    shared = set.intersection(*(set(seeds) for seeds in by_lr.values()))

    def score(lr):
        values = [v for s, v in by_lr[lr].items() if s in shared] if shared else list(by_lr[lr].values())
        return sign * sum(values) / len(values)

    return max(by_lr, key=lambda lr: (score(lr), -lr))


def _compare(row: dict, ref: dict, metric: str) -> dict:
    if len(row["matrix"]) >= 2 and len(ref["matrix"]) >= 2:
        return {**seed_question_t(row["matrix"], ref["matrix"]), "test": TWO_LEVEL}
    a, b = row["matrix"][0], ref["matrix"][0]
    out = paired_bootstrap(a, b)
    if metric == "em":
        out = {**out, "p": mcnemar(a, b), "test": MCNEMAR}
    else:
        out = {**out, "test": BOOTSTRAP}
    return out


def summarize(base: dict, runs: list[dict], metric: str, picks: dict | None = None) -> list[dict]:
    """One row per variant at its picked lr (`picks`, or `pick_lr` on its runs), with seed CIs and the
    comparison against LoRA."""
    key = metric_key(metric)
    by_variant = defaultdict(list)
    for r in runs:
        by_variant[r["variant"]].append(r)
    rows = []
    for variant, vruns in by_variant.items():
        lr = (picks or {}).get(variant, pick_lr(vruns, metric))
        tried = sorted({r["lr"] for r in vruns})
        diverged = sorted({r["lr"] for r in vruns if r["status"] == "diverged"})
        if lr is None or not any(r["lr"] == lr and r["status"] == "ok" for r in vruns):
            rows.append({"variant": variant, "status": "diverged", "lr": None, "lrs_tried": tried,
                         "diverged_lrs": diverged, "seeds": [], "per_seed": []})
            continue
        at_lr = sorted((r for r in vruns if r["lr"] == lr), key=lambda r: r["seed"])
        chosen = [r for r in at_lr if r["status"] == "ok"]
        per_seed = [{"seed": r["seed"], "run_id": r["run_id"], "status": r["status"],
                     **({"test": r["test"][key], "valid": r["valid"][key], "test_acc": r["test"]["acc"],
                         "forgetting": r["forgetting"], "wall_time_s": r["wall_time_s"]}
                        if r["status"] == "ok" else {})} for r in at_lr]
        rows.append({"variant": variant, "status": "ok", "lr": lr, "lrs_tried": tried, "diverged_lrs": diverged,
                     "seeds": [r["seed"] for r in chosen],
                     "diverged_seeds": [r["seed"] for r in at_lr if r["status"] != "ok"],
                     "per_seed": per_seed,
                     "test": mean_ci([r["test"][key] for r in chosen]),
                     "valid": mean_ci([r["valid"][key] for r in chosen]),
                     "test_acc": mean_ci([r["test"]["acc"] for r in chosen]),
                     "forgetting": mean_ci([r["forgetting"] for r in chosen]),
                     "trainable_params": chosen[0]["trainable_params"],
                     "wall_time_s": sum(r["wall_time_s"] for r in chosen) / len(chosen),
                     "matrix": [r["test"][f"{key}_scores"] for r in chosen]})
    ref = next((r for r in rows if r["variant"] == "lora" and r["status"] == "ok"), None)
    for row in rows:
        if ref is not None and row is not ref and row["status"] == "ok":
            row["vs_lora"] = _compare(row, ref, metric)
    return rows


def _fmt(mean_hw: tuple[float, float], digits: int) -> str:
    mean, hw = mean_hw
    return f"{mean:.{digits}f} ± {hw:.{digits}f}" if hw else f"{mean:.{digits}f}"


def caption(metric: str) -> str:
    name = "exact match % (numeric answer match)" if metric == "em" else "answer NLL (nats/token, lower is better)"
    return (f"Metric: {name}; mean ± 95% CI (Student t) over seeds. Δ vs LoRA on the same test questions, with "
            f"its 95% CI and two-sided p; the test column names how p was found: {TWO_LEVEL} = two-level t-test "
            "(seed-to-seed variance with Welch–Satterthwaite df, plus the method × question variance), used when "
            f"both methods have ≥ 2 seeds; {MCNEMAR} = exact McNemar on one seed each; {BOOTSTRAP} = paired "
            "bootstrap over questions on one seed each. One-seed tests see only question sampling, not training "
            "noise.")


def markdown_table(base: dict, rows: list[dict], metric: str, title: str, context: list[str] = ()) -> str:
    key = metric_key(metric)
    d = 1 if metric == "em" else 4
    lines = [f"### {title}", "", *context, *([""] if context else []), caption(metric), "",
             "| variant | lr | seeds | test | valid | Δ test vs LoRA [95% CI] | p | test | EM test % | trainable "
             "params | forgetting (Δ NLL) | time/run s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    b_test, b_valid = base["test"][key], base["valid"][key]
    lines.append(f"| base (untrained) | – | – | {b_test:.{d}f} | {b_valid:.{d}f} | – | – | – | "
                 f"{base['test']['acc']:.1f} | 0 | 0 | {base['wall_time_s']:.0f} |")
    sign = 1 if metric == "em" else -1
    scale = 100 if metric == "em" else 1  # per-question EM scores are 0/1; the table shows percentage points
    ok_rows = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -sign * r["test"][0])
    for row in ok_rows:
        vs = row.get("vs_lora")
        if vs:
            dd = d if metric == "em" else d + 1
            delta = f"{vs['diff'] * scale:+.{dd}f} [{vs['lo'] * scale:+.{dd}f}, {vs['hi'] * scale:+.{dd}f}]"
            p, test = f"{vs['p']:.3f}", vs["test"]
        else:  # LoRA itself, or no LoRA row to compare with
            delta, p, test = ("(reference)" if row["variant"] == "lora" else "–"), "–", "–"
        lr = f"{row['lr']:g}" + (f" (best of {len(row['lrs_tried'])}{_edge(row)})" if len(row["lrs_tried"]) > 1
                                 else "")
        seeds = str(len(row["seeds"])) + (f" ({len(row['diverged_seeds'])} diverged)" if row["diverged_seeds"] else "")
        lines.append(f"| {row['variant']} | {lr} | {seeds} | {_fmt(row['test'], d)} | "
                     f"{_fmt(row['valid'], d)} | {delta} | {p} | {test} | {_fmt(row['test_acc'], 1)} | "
                     f"{row['trainable_params']:,} | {_fmt(row['forgetting'], 4)} | {row['wall_time_s']:.0f} |")
    for row in rows:
        if row["status"] != "ok":
            tried = ", ".join(f"{lr:g}" for lr in row["lrs_tried"])
            lines.append(f"| {row['variant']} | diverged at every lr tried ({tried}) | 0 | – | – | – | – | – | – | – "
                         "| – | – |")
    behind = [r["variant"] for r in ok_rows if sign * (r["test"][0] - b_test) <= 0]
    lines += ["", "Every variant beats the untrained base on test." if not behind else
              f"Not better than the untrained base on test: {', '.join(sorted(behind))}."]
    return "\n".join(lines) + "\n"


def _edge(row: dict) -> str:
    """Says when the pick is still the lowest or highest lr tried: its optimum may lie past the grid."""
    tried = row["lrs_tried"]
    return "; the highest tried" if row["lr"] == max(tried) else "; the lowest tried" if row["lr"] == min(tried) else ""


def _slim(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "matrix"}


def write_report(output_dir: Path, base: dict, runs: list[dict], metric: str, title: str,
                 picks: dict | None = None, context: list[str] = (), meta: dict | None = None) -> tuple[str, Path]:
    from .plot import plot

    output_dir = Path(output_dir)
    rows = summarize(base, runs, metric, picks)
    table = markdown_table(base, rows, metric, title, list(context))
    atomic_write_bytes(output_dir / "results.md", table.encode())
    key = metric_key(metric)
    record = {"title": title, "metric": metric, **(meta or {}),
              "base": {"run_id": base["run_id"], "test": base["test"][key], "valid": base["valid"][key],
                       "test_acc": base["test"]["acc"]}, "rows": [_slim(r) for r in rows]}
    atomic_write_bytes(output_dir / "results.json", json.dumps(record, indent=1).encode())
    scores = {"base": {"test": base["test"][f"{key}_scores"], "valid": base["valid"][f"{key}_scores"]}}
    for r in runs:
        if r["status"] == "ok":
            scores[r["run_id"]] = {"variant": r["variant"], "lr": r["lr"], "seed": r["seed"],
                                   "test": r["test"][f"{key}_scores"], "valid": r["valid"][f"{key}_scores"]}
    atomic_write_bytes(output_dir / "scores.json", json.dumps(scores).encode())
    png = plot(base, [r for r in rows if r["status"] == "ok"], metric, output_dir / f"{key}_vs_params.png", title)
    return table, png
