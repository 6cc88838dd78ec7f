"""How the report tables write numbers: mean ± 95% t-interval over seeds, mean [min, max], and a
combined interval with the smallest difference it could detect."""

import math

from stats import detectable, mean_ci


def fmt_ci(values: list[float], signed: bool = False, digits: int = 4, per_seed: bool = False) -> str:
    """'mean ± 95% t-interval' over seeds; per_seed adds each seed's value, '(s0; s1; ...)'."""
    m, ci = mean_ci(values)
    num = lambda x: f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"  # noqa: E731
    out = num(m) + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")
    return out + (f" ({'; '.join(num(x) for x in values)})" if per_seed and len(values) > 1 else "")


def spread(xs: list[float], digits: int = 3) -> str:
    """'mean [min, max]' of a list, each with `digits` decimals."""
    return f"{sum(xs) / len(xs):.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


def fmt_combined(c: dict, digits: int = 4) -> str:
    return f"{c['mean']:+.{digits}f} ± {c['half']:.{digits}f}"


def fmt_detectable(c: dict, digits: int = 4) -> str:
    mdd, lo, hi = detectable(c["se"], c["df"])
    return f"{mdd:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
