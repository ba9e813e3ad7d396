"""Seed intervals and paired tests, in plain Python and torch (no scipy).

mean_ci        mean ± t_{0.975, n-1} · sd / sqrt(n) over seeds (half-width 0 for one seed: no interval).
mcnemar        exact two-sided McNemar test on paired 0/1 outcomes (binomial on the discordant pairs).
paired_bootstrap  resample questions with replacement; CI of mean(a - b) and a two-sided p-value
               (twice the smaller tail mass around 0). Works for 0/1 exact match and for per-item NLL,
               and for seed-averaged per-item scores.
"""

from __future__ import annotations

import math

import torch

# two-sided 95% Student t quantiles, df 1..30; beyond 30 the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width) across seeds."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def mcnemar(a: list[float], b: list[float]) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes a and b."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean difference a - b over paired items with a bootstrap 95% CI and a two-sided p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores must be non-empty and equal in length: {len(a)} vs {len(b)}")
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    n = len(diffs)
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    means = diffs[idx].mean(1).sort().values
    below = (means <= 0).double().mean().item()
    above = (means >= 0).double().mean().item()
    return {"diff": diffs.mean().item(), "lo": means[int(0.025 * n_boot)].item(),
            "hi": means[int(0.975 * n_boot) - 1].item(), "p": min(1.0, 2 * min(below, above))}


def seed_mean_scores(per_seed: list[list[float]]) -> list[float]:
    """Per-item scores averaged over seeds (all seeds must score the same items in the same order)."""
    if len({len(s) for s in per_seed}) != 1:
        raise ValueError("seeds scored different numbers of items; they must share one eval set")
    return [sum(col) / len(col) for col in zip(*per_seed, strict=True)]
