"""dev/stats.py, the significance rule of dev/ablate.py and dev/record.py: the one-sided paired t-test
against printed t tables, and its invariances."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from dev.stats import paired_lower


@pytest.mark.parametrize("t, df, cdf", [  # critical values of the t table (e.g. NIST/SEMATECH 1.3.6.7.2)
    (6.965, 2, 0.99), (4.541, 3, 0.99), (2.571, 5, 0.975), (1.812, 10, 0.95), (2.528, 20, 0.99),
    (1.000, 1, 0.75), (31.821, 1, 0.99)])
def test_p_matches_the_t_table(t, df, cdf):
    """df + 1 pairs whose differences have mean -t * sd / sqrt(n): p is the table's lower tail, and the
    same pairs the other way round give its complement."""
    n = df + 1
    spread = [i - df / 2 for i in range(n)]
    sd = math.sqrt(sum(s * s for s in spread) / df)
    diffs = [-t * sd / math.sqrt(n) + s for s in spread]
    reference = [1.5] * n
    values = [r + d for r, d in zip(reference, diffs)]
    assert paired_lower(values, reference)[1] == pytest.approx(1 - cdf, abs=1e-4)
    assert paired_lower(reference, values)[1] == pytest.approx(cdf, abs=1e-4)


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 80), st.integers(-8, 8)), min_size=2, max_size=8),
       shift=st.integers(-5, 5))
def test_paired_test_sees_only_the_differences(pairs, shift):
    """Shifting both sides alike changes nothing; p < 1/2 exactly when the variant is lower on average;
    the test the other way round is its complement. (Losses in eighths, so every sum here is exact.)"""
    reference = [r / 8 for r, _ in pairs]
    values = [(r + d) / 8 for r, d in pairs]
    diff, p = paired_lower(values, reference)
    diff2, p2 = paired_lower([v + shift for v in values], [r + shift for r in reference])
    assert diff2 == pytest.approx(diff, abs=1e-9) and p2 == pytest.approx(p, abs=1e-6)
    assert 0 <= p <= 1
    if abs(diff) > 1e-9:
        assert (p < 0.5) == (diff < 0)
        assert paired_lower(reference, values)[1] == pytest.approx(1 - p, abs=1e-9)


def test_three_seeds_that_all_improve_clearly_pass_the_rule():
    """Three seeds, each 0.05 lower with little spread: p < 0.01; the same mean with a wide spread: not."""
    assert paired_lower([1.80, 1.79, 1.81], [1.85, 1.845, 1.855])[1] < 0.01
    assert paired_lower([1.70, 1.89, 1.81], [1.85, 1.845, 1.855])[1] > 0.01


def test_no_spread_is_certain_and_one_pair_is_refused():
    assert paired_lower([1.0, 2.0], [1.5, 2.5]) == (-0.5, 0.0)
    assert paired_lower([2.0, 3.0], [1.5, 2.5]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_lower([1.0], [2.0])
