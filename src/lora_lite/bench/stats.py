"""Seed intervals and method comparisons, in plain Python and torch (no scipy).

mean_ci          mean ± t_{0.975, n-1} · sd / sqrt(n) over seeds (half-width 0 for one seed: no interval).
seed_question_t  the table's test when both methods have >= 2 seeds. A method's score is a mean over seeds
                 and over test questions, and both are samples: seeds of the training noise, questions of the
                 task. The variance of the difference is estimated at both levels,
                     se² = var(seed means of A)/n_A + var(seed means of B)/n_B + v_q / Q,
                 where v_q is the method × question interaction: the variance over questions of the
                 seed-averaged per-question difference, minus the seed-to-seed noise that variance already holds
                 (from a two-way seeds × questions decomposition of each method), floored at 0. The statistic is
                 referred to Student's t with Welch–Satterthwaite degrees of freedom, so a method compared with
                 itself is "significant" at about the nominal 5% (tests/test_bench_stats.py checks this).
mcnemar          exact two-sided McNemar test on paired 0/1 outcomes (one seed per method: it measures the
                 question sampling only, conditional on the two trained adapters).
paired_bootstrap resample questions with replacement; CI of mean(a - b) and a two-sided p (one seed, NLL).
t_quantile, t_sf Student t from the regularized incomplete beta function, for any real df > 0.
"""

from __future__ import annotations

import math

import torch


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if not df > 0:
        raise ValueError(f"need df > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), by bisection on the two-sided tail."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1, got {p}")
    target = 2.0 * (1.0 - p)
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t975(df: float) -> float:
    return t_quantile(0.975, df)


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


def _two_way(scores: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Seed means, their variance, and the seeds × questions residual variance of one method's score matrix."""
    n, q = scores.shape
    seed_means = scores.mean(1)
    residual = scores - seed_means[:, None] - scores.mean(0)[None, :] + scores.mean()
    return seed_means, seed_means.var().item(), (residual.square().sum() / ((n - 1) * (q - 1))).item()


def seed_question_t(a: list[list[float]], b: list[list[float]]) -> dict:
    """Difference mean(a) - mean(b) of two methods' seeds × questions score matrices (same questions, same
    order), with its standard error at both levels, a 95% CI and a two-sided p. Both need >= 2 seeds."""
    A, B = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[1] or A.shape[1] < 2:
        raise ValueError(f"need two seeds x questions matrices over the same >= 2 questions, got {tuple(A.shape)} "
                         f"and {tuple(B.shape)}")
    (n, q), m = A.shape, B.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"seed_question_t needs >= 2 seeds per method, got {n} and {m}")
    _, var_a, resid_a = _two_way(A)
    _, var_b, resid_b = _two_way(B)
    per_question = A.mean(0) - B.mean(0)
    interaction = max(0.0, per_question.var().item() - resid_a / n - resid_b / m)
    parts = [(var_a / n, n - 1), (var_b / m, m - 1), (interaction / q, q - 1)]
    se2 = sum(v for v, _ in parts)
    diff = (A.mean() - B.mean()).item()
    if se2 <= 0.0:  # every seed of each method scored identically: the difference is exact
        return {"diff": diff, "lo": diff, "hi": diff, "p": 1.0 if diff == 0 else 0.0, "df": math.inf, "se": 0.0}
    df = se2 ** 2 / sum(v ** 2 / k for v, k in parts if v > 0)
    se = math.sqrt(se2)
    half = t975(df) * se
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "p": t_sf2(diff / se, df), "df": df, "se": se}


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
