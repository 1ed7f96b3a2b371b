"""The significance rule of scripts/ablate.py: a one-sided paired t-test over seeds, with Student's t
distribution from the regularized incomplete beta function (no SciPy on the training path)."""

from __future__ import annotations

import math
from statistics import mean, stdev


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes 6.4),
    evaluated on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _continued_fraction(a, b, x) / a
    return 1 - front * _continued_fraction(b, a, 1 - x) / b


def _continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of I_x(a, b)."""
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term, then odd term
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with df degrees of freedom."""
    # the two forms of the same tail: the first unless t is so small that df / (df + t^2) rounds toward 1;
    # the second subtracts from 1, so past t^2 = df / 100 its tail (1e-27 at t -13, df 169) would round to 0
    if t * t > df / 100:
        tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    else:
        tail = 0.5 * (1 - betainc(0.5, df / 2, t * t / (df + t * t)))
    return 1 - tail if t > 0 else tail


def paired_lower(values: list[float], reference: list[float]) -> tuple[float, float]:
    """(mean of values - reference, p): p of a one-sided paired t-test that values are lower than reference
    (pairs by position, e.g. by seed). With no spread in the differences p is 0 or 1."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    if len(diffs) < 2:
        raise ValueError("a paired t-test needs at least 2 pairs")
    d, sd = mean(diffs), stdev(diffs)
    if sd == 0:
        return d, 0.0 if d < 0 else 1.0
    return d, t_cdf(d / (sd / math.sqrt(len(diffs))), len(diffs) - 1)
