"""stats.py, the study's pure statistics, against hand-computed values (and closed forms)."""

import math

import pytest

import stats as S


def test_ranks_and_spearman_by_hand():
    assert S.ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]  # ties share their mean rank
    # ranks of b are 1 2 4 3: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert S.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))  # no spread, no correlation


def test_partial_spearman_removes_a_shared_cause():
    # a and b both follow t, plus independent wiggles: correlated, but not once t is held fixed
    import random
    rng = random.Random(0)
    t = [i % 4 for i in range(200)]  # four strata, far apart
    a = [10 * x + rng.random() for x in t]
    b = [10 * x + rng.random() for x in t]
    assert S.spearman(a, b) > 0.85
    assert abs(S.partial_spearman(a, b, [t])) < 0.15
    c = [x + 0.5 * y for x, y in zip(a, b)]  # depends on b beyond t: the partial correlation stays
    assert S.partial_spearman(c, b, [t]) > 0.3
    # residuals of a line on its own covariate are zero
    assert max(abs(r) for r in S.residuals([2 * x + 1 for x in t], [t])) < 1e-9


def test_auc_by_hand():
    assert S.auc([1, 2], [3, 4]) == 1.0
    assert S.auc([3, 4], [1, 2]) == 0.0
    # pairs (1,2) win, (3,2) loses, ties count half: (1,2) (1,2) (3,2) (3,2) -> 2 / 4
    assert S.auc([1, 3], [2, 2]) == 0.5
    assert S.auc([1, 2], [2, 2]) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_pair_bootstrap():
    lo, hi = S.pair_bootstrap([[1.0] * 50])  # a constant difference has no sampling error
    assert lo == hi == 1.0
    lo, hi = S.pair_bootstrap([[0.0, 1.0] * 100])  # mean 0.5, s.e. 0.5 / sqrt(200) = 0.035
    assert 0.40 < lo < 0.46 and 0.54 < hi < 0.60


def test_t_and_chi2_against_closed_forms_and_tables():
    # t with 2 df: P(T <= x) = 1/2 + x / (2 sqrt(2 + x^2)); with 1 df (Cauchy): 1/2 + atan(x) / pi
    for x in (-3.0, -0.4, 0.0, 0.7, 2.5):
        assert S.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-12)
        assert S.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-12)
    for df, t95 in S.T95.items():  # the printed table, to its 3 decimals
        assert S.t_quantile(0.975, df) == pytest.approx(t95, abs=6e-4)
        assert S.t_quantile(0.8, df) == pytest.approx(S.T80[df], abs=6e-4)
    assert S.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal's
    # chi-square with 2 df is exponential with mean 2: P(X <= x) = 1 - exp(-x / 2), quantile -2 ln(1 - p)
    for p in (0.025, 0.5, 0.975):
        assert S.chi2_quantile(p, 2) == pytest.approx(-2 * math.log(1 - p), rel=1e-9)
    # with 1 df, X = Z^2: P(X <= 3.841459) = P(|Z| <= 1.959964) = 0.95
    assert S.chi2_cdf(1.959964 ** 2, 1) == pytest.approx(0.95, abs=1e-6)


def test_combined_interval_by_hand():
    """2 seeds x 2 pairs, d = [[1, 3], [3, 5]]: seed means 2 and 4 (variance 2, se_seed^2 = 2 / 2 = 1);
    pair means 2 and 4 (se_pair^2 = 1); se = sqrt(2); Welch-Satterthwaite df = 2^2 / (1/1 + 1/1) = 2;
    half = t(.975, 2) sqrt(2) = 4.3027 * 1.4142; p = 2 (1 - P(T_2 <= 3 / sqrt(2)))."""
    c = S.combined_interval([[1.0, 3.0], [3.0, 5.0]])
    assert c["mean"] == 3.0 and c["se_seed"] == pytest.approx(1.0) and c["se_pair"] == pytest.approx(1.0)
    assert c["df"] == pytest.approx(2.0) and c["se"] == pytest.approx(math.sqrt(2))
    assert c["half"] == pytest.approx(4.302653 * math.sqrt(2), rel=1e-6)
    t = 3 / math.sqrt(2)
    assert c["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # t with 2 df, two-sided
    # one seed: the test pairs alone, t with n_pairs - 1 df (here the paired t-test of 0, 1, 2, 3)
    one = S.combined_interval([[0.0, 1.0, 2.0, 3.0]])
    assert one["se_seed"] == 0.0 and one["df"] == pytest.approx(3.0)
    assert one["half"] == pytest.approx(3.182446 * math.sqrt((5 / 3) / 4), rel=1e-6)
    # seeds that agree exactly: only the pairs' noise is left
    same = S.combined_interval([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    assert same["se_seed"] == 0.0 and same["se_pair"] == pytest.approx(1.0) and same["df"] == pytest.approx(1.0)
    # the combined interval is never narrower than either component's standard error alone
    d = [[0.1, -0.2, 0.3, 0.0], [0.4, 0.1, 0.2, 0.3], [-0.1, 0.0, 0.1, 0.2]]
    c = S.combined_interval(d)
    assert c["se"] >= max(c["se_seed"], c["se_pair"])
    with pytest.raises(ValueError):
        S.combined_interval([[0.0, 1.0], [0.0]])
    assert S.combined_interval([[0.5, 0.5], [0.5, 0.5]])["p"] == 0.0  # no noise at all, not 0


def test_detectable_with_its_range():
    """(t.975 + t.80) se, and the range from se's own uncertainty: with 2 df the s.d. is known to within
    sqrt(2 / chi2(.975, 2)) = 0.52x to sqrt(2 / chi2(.025, 2)) = 6.28x (chi2 quantiles -2 ln(0.025), -2 ln(0.975))."""
    mdd, lo, hi = S.detectable(0.01, 2)
    assert mdd == pytest.approx((4.302653 + 1.060660) * 0.01, rel=1e-5)
    assert lo / mdd == pytest.approx(math.sqrt(2 / (-2 * math.log(0.025))), rel=1e-6)
    assert hi / mdd == pytest.approx(math.sqrt(2 / (-2 * math.log(0.975))), rel=1e-6)
    assert 0.52 < lo / mdd < 0.53 and 6.28 < hi / mdd < 6.29
    assert S.detectable(0.0, 5) == (0.0, 0.0, 0.0)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> 0.09 (non-decreasing), 0.5
    assert S.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert S.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert S.holm([0.9, 0.9, 0.9]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    assert S.holm([]) == []
