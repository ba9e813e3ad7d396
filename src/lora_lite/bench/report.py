"""Outputs: summary.tsv (appended under a file lock), the markdown results table, and the params plot.

The table has one row per variant at its chosen lr: test and valid as mean ± 95% CI over seeds, the paired
difference against LoRA on the same test questions (bootstrap CI and p-value over questions, on the
seed-averaged per-question scores), trainable params, forgetting and wall time. The untrained base is the
first row: it is the floor every adapter must clear.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_bytes
from .stats import mcnemar, mean_ci, paired_bootstrap, seed_mean_scores

SUMMARY_COLUMNS = ("run_id", "variant", "preset", "model", "seed", "lr", "r", "steps", "metric", "test", "valid",
                   "test_acc", "valid_acc", "trainable_params", "forgetting", "train_time_s", "wall_time_s",
                   "status", "commit", "time_utc", "result_json")


def metric_key(metric: str) -> str:
    return {"em": "acc", "nll": "nll"}[metric]


def append_summary(output_dir: Path, result: dict, metric: str) -> None:
    """Append one row to output_dir/summary.tsv under an exclusive lock on summary.tsv.lock.

    A file whose header differs (older column set) is renamed to summary.<UTC>.tsv.bak first.
    """
    import fcntl

    key = metric_key(metric)
    row = {"run_id": result["run_id"], "variant": result["variant"], "preset": result["preset"],
           "model": result["model"], "seed": result["seed"], "lr": f"{result['lr']:g}", "r": result["r"],
           "steps": result["preset_settings"]["steps"], "metric": key,
           "test": f"{result['test'][key]:.4f}", "valid": f"{result['valid'][key]:.4f}",
           "test_acc": f"{result['test']['acc']:.2f}", "valid_acc": f"{result['valid']['acc']:.2f}",
           "trainable_params": result["trainable_params"], "forgetting": f"{result['forgetting']:.4f}",
           "train_time_s": f"{result['train']['train_time_s']:.1f}", "wall_time_s": f"{result['wall_time_s']:.1f}",
           "status": result["status"], "commit": result["commit"][:12], "time_utc": result["time_utc"],
           "result_json": str(Path(output_dir) / result["run_id"] / "result.json")}
    path = Path(output_dir) / "summary.tsv"
    header = "\t".join(SUMMARY_COLUMNS) + "\n"
    line = "\t".join(str(row[c]).replace("\t", " ").replace("\n", " ") for c in SUMMARY_COLUMNS) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tsv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                with open(path) as f:
                    if f.readline() != header:
                        path.rename(path.with_name(f"summary.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tsv.bak"))
            new = not path.exists()
            with open(path, "a") as f:
                f.write((header if new else "") + line)
                f.flush()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pick_lr(runs: list[dict], metric: str) -> float:
    """The lr whose runs have the best mean valid score (higher acc / lower nll); diverged lrs never win."""
    key, sign = metric_key(metric), (1 if metric == "em" else -1)
    by_lr = defaultdict(list)
    for r in runs:
        if r["status"] == "ok":
            by_lr[r["lr"]].append(r["valid"][key])
    if not by_lr:
        raise ValueError(f"every run of {runs[0]['variant']} diverged; no learning rate to pick")
    return max(by_lr, key=lambda lr: (sign * sum(by_lr[lr]) / len(by_lr[lr]), -lr))


def summarize(base: dict, runs: list[dict], metric: str) -> list[dict]:
    """One row per variant at its picked lr, with seed CIs and paired tests against LoRA."""
    key = metric_key(metric)
    by_variant = defaultdict(list)
    for r in runs:
        by_variant[r["variant"]].append(r)
    rows = []
    for variant, vruns in by_variant.items():
        lr = pick_lr(vruns, metric)
        chosen = sorted((r for r in vruns if r["lr"] == lr and r["status"] == "ok"), key=lambda r: r["seed"])
        rows.append({"variant": variant, "lr": lr, "lrs_tried": sorted({r["lr"] for r in vruns}),
                     "diverged_lrs": sorted({r["lr"] for r in vruns if r["status"] != "ok"}),
                     "seeds": [r["seed"] for r in chosen],
                     "test": mean_ci([r["test"][key] for r in chosen]),
                     "valid": mean_ci([r["valid"][key] for r in chosen]),
                     "test_acc": mean_ci([r["test"]["acc"] for r in chosen]),
                     "forgetting": mean_ci([r["forgetting"] for r in chosen]),
                     "trainable_params": chosen[0]["trainable_params"],
                     "wall_time_s": sum(r["wall_time_s"] for r in chosen) / len(chosen),
                     "item_scores": seed_mean_scores([r["test"][f"{key}_scores"] for r in chosen]),
                     "acc_item_scores": [r["test"]["acc_scores"] for r in chosen]})
    ref = next((r for r in rows if r["variant"] == "lora"), None)
    for row in rows:
        if ref is not None and row is not ref:
            row["vs_lora"] = paired_bootstrap(row["item_scores"], ref["item_scores"])
            if len(row["seeds"]) == 1 and len(ref["seeds"]) == 1:
                row["mcnemar_p"] = mcnemar(row["acc_item_scores"][0], ref["acc_item_scores"][0])
    return rows


def _fmt(mean_hw: tuple[float, float], digits: int) -> str:
    mean, hw = mean_hw
    return f"{mean:.{digits}f} ± {hw:.{digits}f}" if hw else f"{mean:.{digits}f}"


def markdown_table(base: dict, rows: list[dict], metric: str, title: str) -> str:
    key = metric_key(metric)
    name = "exact match %" if metric == "em" else "answer NLL (nats/token, lower is better)"
    d = 1 if metric == "em" else 4
    lines = [f"### {title}", "",
             f"Metric: {name}; mean ± 95% CI over seeds. Δ vs LoRA: paired bootstrap over test questions "
             "(seed-averaged per-question scores), with its 95% CI and two-sided p.", "",
             "| variant | lr | seeds | test | valid | Δ test vs LoRA [95% CI] | p | EM test % | trainable params "
             "| forgetting (Δ NLL) | time/run s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    b_test, b_valid = base["test"][key], base["valid"][key]
    lines.append(f"| base (untrained) | – | – | {b_test:.{d}f} | {b_valid:.{d}f} | – | – | {base['test']['acc']:.1f} "
                 f"| 0 | 0 | {base['wall_time_s']:.0f} |")
    sign = 1 if metric == "em" else -1
    scale = 100 if metric == "em" else 1  # per-question EM scores are 0/1; the table shows percentage points
    for row in sorted(rows, key=lambda r: -sign * r["test"][0]):
        vs = row.get("vs_lora")
        if vs:
            dd = d if metric == "em" else d + 1
            delta = f"{vs['diff'] * scale:+.{dd}f} [{vs['lo'] * scale:+.{dd}f}, {vs['hi'] * scale:+.{dd}f}]"
            p = f"{vs['p']:.3f}"
        else:
            delta, p = "(reference)", "–"
        lr = f"{row['lr']:g}" + (f" (best of {len(row['lrs_tried'])})" if len(row["lrs_tried"]) > 1 else "")
        lines.append(f"| {row['variant']} | {lr} | {len(row['seeds'])} | {_fmt(row['test'], d)} | "
                     f"{_fmt(row['valid'], d)} | {delta} | {p} | {_fmt(row['test_acc'], 1)} | "
                     f"{row['trainable_params']:,} | {_fmt(row['forgetting'], 4)} | {row['wall_time_s']:.0f} |")
    behind = [r["variant"] for r in rows if sign * (r["test"][0] - b_test) <= 0]
    lines += ["", "Every variant beats the untrained base on test." if not behind else
              f"Not better than the untrained base on test: {', '.join(sorted(behind))}."]
    return "\n".join(lines) + "\n"


def plot(base: dict, rows: list[dict], metric: str, path: Path, title: str) -> Path:
    """Test metric against trainable params (log x), with 95% CI bars over seeds; the base as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = metric_key(metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for row in rows:
        mean, hw = row["test"]
        ax.errorbar(row["trainable_params"], mean, yerr=hw, fmt="o", capsize=4)
        ax.annotate(row["variant"], (row["trainable_params"], mean), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axhline(base["test"][key], color="grey", linestyle="--", linewidth=1, label="untrained base")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test exact match %" if metric == "em" else "test answer NLL (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(output_dir: Path, base: dict, runs: list[dict], metric: str, title: str) -> tuple[str, Path]:
    rows = summarize(base, runs, metric)
    table = markdown_table(base, rows, metric, title)
    atomic_write_bytes(Path(output_dir) / "results.md", table.encode())
    slim = [{k: v for k, v in r.items() if not k.endswith("item_scores")} for r in rows]
    atomic_write_bytes(Path(output_dir) / "results.json", json.dumps({"base_test": base["test"].get(
        metric_key(metric)), "rows": slim}, indent=1).encode())
    png = plot(base, rows, metric, Path(output_dir) / f"{metric_key(metric)}_vs_params.png", title)
    return table, png
