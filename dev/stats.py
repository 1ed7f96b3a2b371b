"""The significance rule of dev/ablate.py and dev/record.py: a one-sided paired t-test over seeds (SciPy,
requirements-dev.txt; training never imports it)."""

from __future__ import annotations

from statistics import mean, stdev

from scipy.stats import ttest_rel


def paired_lower(values: list[float], reference: list[float]) -> tuple[float, float]:
    """(mean of values - reference, p): p of a one-sided paired t-test that values are lower than reference
    (pairs by position, e.g. by seed). With no spread in the differences p is 0 or 1."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    if len(diffs) < 2:
        raise ValueError("a paired t-test needs at least 2 pairs")
    d = mean(diffs)
    if stdev(diffs) == 0:  # SciPy's t statistic is undefined (nan) there
        return d, 0.0 if d < 0 else 1.0
    return d, float(ttest_rel(values, reference, alternative="less").pvalue)
