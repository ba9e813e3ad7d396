"""The bench's statistics: Student t at any df, the two-level (seeds, then questions) test at its nominal
false-positive rate on synthetic runs, McNemar, and the table naming the test behind each p."""

import math

import pytest
import torch

from lora_lite.bench import stats


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (4.5, 2.6589), (30, 2.0423),
                                         (60, 2.0003), (120, 1.9799), (1e6, 1.9600)])
def test_t_quantile_at_any_df(df, expected):
    assert stats.t975(df) == pytest.approx(expected, abs=1e-4)  # no normal fallback above 30 df


def test_t_tail_matches_known_values():
    assert stats.t_sf2(2.7764, 4) == pytest.approx(0.05, abs=1e-4)
    assert stats.t_sf2(0.0, 3) == pytest.approx(1.0)
    assert stats.t_sf2(1.0, 1) == pytest.approx(0.5, abs=1e-9)  # Cauchy: P(|T| > 1) = 1/2


def test_mean_ci_uses_student_t():
    mean, hw = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert stats.mean_ci([5.0]) == (5.0, 0.0)


def test_mcnemar_exact_values():
    # 10 discordant pairs split 9/1: two-sided exact binomial p = 2 * (1 + 10) / 1024
    a = [1] * 9 + [0] * 1 + [1] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5
    assert stats.mcnemar(a, b) == pytest.approx(22 / 1024)
    assert stats.mcnemar(a, a) == 1.0
    assert stats.mcnemar([1, 0], [0, 1]) == 1.0


def test_paired_bootstrap_separates_a_real_gap_from_noise():
    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 40 + [0.0] * 60
    strong = stats.paired_bootstrap(a, b)
    assert strong["diff"] == pytest.approx(0.2) and strong["lo"] > 0 and strong["p"] < 0.01
    same = stats.paired_bootstrap(a, list(a))
    assert same["diff"] == 0 and same["p"] == 1.0


def _method(g, theta, seeds, seed_sd, shift=0.0):
    """Exact-match scores of one method: question difficulty theta, a per-seed skill offset (training noise)."""
    skill = torch.randn(seeds, 1, generator=g) * seed_sd
    return torch.bernoulli(torch.sigmoid(theta[None] + skill + shift), generator=g).tolist()


def _rate(test, trials, seed_sd, seeds=3, questions=200, shift=0.0):
    g = torch.Generator().manual_seed(7)
    hits = 0
    for _ in range(trials):
        theta = torch.randn(questions, generator=g) * 2.0
        hits += test(_method(g, theta, seeds, seed_sd, shift), _method(g, theta, seeds, seed_sd)) < 0.05
    return hits / trials


def _two_level(a, b):
    return stats.seed_question_t(a, b)["p"]


def _questions_only(a, b):  # the old table's test: bootstrap over questions of seed-averaged scores
    mean = lambda m: [sum(col) / len(col) for col in zip(*m, strict=True)]  # noqa: E731
    return stats.paired_bootstrap(mean(a), mean(b), n_boot=500)["p"]


@pytest.mark.parametrize("seed_sd", [0.0, 0.8])
def test_a_method_against_itself_is_significant_at_about_5_percent(seed_sd):
    rate = _rate(_two_level, 600, seed_sd)
    assert 0.02 <= rate <= 0.08, rate  # 600 trials: 5% +- 1.8% (2 sd)


def test_the_questions_only_bootstrap_it_replaces_is_far_too_eager():
    assert _rate(_questions_only, 150, 0.8) > 0.2


def test_the_two_level_test_still_sees_a_real_gap():
    assert _rate(_two_level, 100, 0.3, shift=1.2) > 0.6  # 3 seeds a side: power is modest


def test_seed_question_t_degenerate_cases():
    same = [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    assert stats.seed_question_t(same, same)["p"] == 1.0
    exact = stats.seed_question_t([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert exact["diff"] == 1.0 and exact["p"] == 0.0
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.seed_question_t([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
