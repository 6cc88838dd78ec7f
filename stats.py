"""The study's statistics: pure functions of lists of floats (ranks, correlations, intervals over
seeds and test pairs, detectability, Holm's correction), each tested against hand-computed values
in tests/test_stats.py. No torch, no files: the report modules (report_*.py) feed them the result
files' numbers."""

import math
import random

# t quantiles by degrees of freedom (the tables' 1..9; t_quantile computes any other)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def variance(xs: list[float]) -> float:
    """The unbiased sample variance (n - 1 in the denominator); 0 for one value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (nan for one seed)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    if n < 2:
        return mean(values), float("nan")
    return mean(values), T95.get(n - 1, 1.96) * math.sqrt(variance(values) / n)


def ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties given their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa, sbb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return sab / math.sqrt(saa * sbb) if saa > 0 and sbb > 0 else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(ranks(a), ranks(b))


def residuals(y: list[float], covariates: list[list[float]]) -> list[float]:
    """y minus its least-squares fit on the covariates (and an intercept)."""
    import torch
    X = torch.tensor([[1.0] + list(c) for c in zip(*covariates)], dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(X, t).solution
    return (t - X @ coef)[:, 0].tolist()


def partial_spearman(a: list[float], b: list[float], covariates: list[list[float]]) -> float:
    """Spearman correlation of a and b with the covariates' (ranked) linear effect removed from both."""
    cov = [ranks(c) for c in covariates]
    return pearson(residuals(ranks(a), cov), residuals(ranks(b), cov))


def auc(lower: list[float], higher: list[float]) -> float:
    """P(a value of `lower` < a value of `higher`) (ties count half): 1 = always lower, 0.5 = no order."""
    wins = sum((x < y) + 0.5 * (x == y) for x in lower for y in higher)
    return wins / (len(lower) * len(higher))


def pair_bootstrap(diffs: list[list[float]], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over seeds of the mean per-pair difference, resampling the test
    pairs (the same resampled pairs for every seed): the test split's own sampling error, with the
    trained policies held fixed."""
    rng, n = random.Random(seed), len(diffs[0])
    means = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        means.append(sum(sum(d[i] for i in idx) / n for d in diffs) / len(diffs))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


# -----------------------------------------------------------------------------
# Student's t and chi-square, for any (non-integer) degrees of freedom


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1 / (1 +
    d2 / (1 + ...))), the continued fraction evaluated by modified Lentz, on the side of x where it
    converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(1, 400):
        m = i // 2
        if i % 2:  # odd terms: -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # even terms: m (b - m) x / ((a + 2m - 1)(a + 2m))
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front / f  # f = 1 + d1 / (1 + d2 / (1 + ...)), I_x = front / f


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with df (> 0, any real) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def chi2_cdf(x: float, df: float) -> float:
    """P(X <= x) for a chi-square with df degrees of freedom: the regularised lower incomplete gamma
    P(df/2, x/2), by its series (which converges for every x)."""
    if x <= 0:
        return 0.0
    a, z = df / 2, x / 2
    term = total = 1.0 / a
    n = 0
    while term > 1e-17 * total and n < 100_000:
        n += 1
        term *= z / (a + n)
        total += term
    return min(1.0, total * math.exp(a * math.log(z) - z - math.lgamma(a)))


def _invert(cdf, p: float, lo: float, hi: float) -> float:
    """The x in [lo, hi] with cdf(x) = p, by bisection (cdf increasing)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(p: float, df: float) -> float:
    return _invert(lambda x: t_cdf(x, df), p, -1e6, 1e6)


def chi2_quantile(p: float, df: float) -> float:
    return _invert(lambda x: chi2_cdf(x, df), p, 0.0, 1e4)


# -----------------------------------------------------------------------------
# a paired difference over seeds AND test pairs


def combined_interval(diffs: list[list[float]]) -> dict:
    """The paired difference d[s][p] (seed s, test pair p; the same pairs for every seed) as the mean
    over seeds of each seed's mean over pairs, with one interval that holds both sources of noise:

        se_seed^2 = var_s(mean_p d[s][p]) / n_seeds     (training noise, test pairs held fixed)
        se_pair^2 = var_p(mean_s d[s][p]) / n_pairs     (the test split's sampling, policies fixed)
        se^2 = se_seed^2 + se_pair^2,   df by Welch-Satterthwaite,   half = t(.975, df) * se

    Adding the two variance components counts their interaction twice (it sits in both), so the
    interval errs wide. p is the two-sided p-value of mean = 0 on the same t. One seed: the pair
    term alone."""
    n, P = len(diffs), len(diffs[0])
    if any(len(d) != P for d in diffs):
        raise ValueError("every seed needs the same test pairs")
    seed_means = [mean(d) for d in diffs]
    pair_means = [mean([d[p] for d in diffs]) for p in range(P)]
    v_seed = variance(seed_means) / n if n > 1 else 0.0
    v_pair = variance(pair_means) / P
    m, se = mean(seed_means), math.sqrt(v_seed + v_pair)
    parts = (v_seed ** 2 / (n - 1) if n > 1 else 0.0) + (v_pair ** 2 / (P - 1) if P > 1 else 0.0)
    if se == 0:
        return dict(mean=m, se_seed=0.0, se_pair=0.0, se=0.0, df=math.inf, half=0.0, p=1.0 if m == 0 else 0.0)
    df = (v_seed + v_pair) ** 2 / parts
    p = 2 * (1 - t_cdf(abs(m) / se, df))
    return dict(mean=m, se_seed=math.sqrt(v_seed), se_pair=math.sqrt(v_pair), se=se, df=df,
                half=t_quantile(0.975, df) * se, p=p)


def detectable(se: float, df: float, power: float = 0.8) -> tuple[float, float, float]:
    """The smallest true difference a two-sided 5% test detects with this power, (t.975 + t.power) * se,
    and its own 95% range from the uncertainty of se (estimated with df degrees of freedom:
    se * sqrt(df / chi2(.975, df)) to se * sqrt(df / chi2(.025, df))). -> (mdd, low, high)."""
    if se == 0:
        return 0.0, 0.0, 0.0
    mdd = (t_quantile(0.975, df) + t_quantile(power, df)) * se
    return mdd, mdd * math.sqrt(df / chi2_quantile(0.975, df)), mdd * math.sqrt(df / chi2_quantile(0.025, df))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error): sorted ascending, the k-th (from 0)
    times (m - k), made non-decreasing, capped at 1; returned in the input's order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        out[i] = running
    return out
