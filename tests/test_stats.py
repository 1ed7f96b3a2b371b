"""utils/stats.py, the significance rule of scripts/ablate.py: Student's t against printed tables and
the normal limit, and the paired test's invariances."""

import math

import pytest
from hypothesis import example, given, settings, strategies as st

from utils.stats import paired_lower, t_cdf


@pytest.mark.parametrize("t, df, cdf", [  # critical values of the t table (e.g. NIST/SEMATECH 1.3.6.7.2)
    (6.965, 2, 0.99), (4.541, 3, 0.99), (2.571, 5, 0.975), (1.812, 10, 0.95), (2.528, 20, 0.99),
    (1.000, 1, 0.75), (31.821, 1, 0.99)])
def test_t_cdf_matches_the_table(t, df, cdf):
    assert t_cdf(t, df) == pytest.approx(cdf, abs=1e-4)
    assert t_cdf(-t, df) == pytest.approx(1 - cdf, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(t=st.floats(-50, 50), df=st.floats(0.5, 200))
@example(t=-13.0625, df=169.0)  # its neighbour's tail (1e-27) once rounded to 0 in the form that subtracts from 1
def test_t_cdf_is_a_symmetric_distribution(t, df):
    assert 0 <= t_cdf(t, df) <= 1
    assert t_cdf(t, df) + t_cdf(-t, df) == pytest.approx(1, abs=1e-12)
    assert t_cdf(t + 0.1, df) >= t_cdf(t, df)


@given(t=st.floats(-6, 6))
def test_t_cdf_tends_to_the_normal(t):
    assert t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 80), st.integers(-8, 8)), min_size=2, max_size=8),
       shift=st.integers(-5, 5))
def test_paired_test_sees_only_the_differences(pairs, shift):
    """Shifting both sides alike changes nothing; p < 1/2 exactly when the variant is lower on average.
    (Losses in eighths, so every sum here is exact.)"""
    reference = [r / 8 for r, _ in pairs]
    values = [(r + d) / 8 for r, d in pairs]
    diff, p = paired_lower(values, reference)
    diff2, p2 = paired_lower([v + shift for v in values], [r + shift for r in reference])
    assert diff2 == pytest.approx(diff, abs=1e-9) and p2 == pytest.approx(p, abs=1e-6)
    if abs(diff) > 1e-9:
        assert (p < 0.5) == (diff < 0)


def test_three_seeds_that_all_improve_clearly_pass_the_rule():
    """Three seeds, each 0.05 lower with little spread: p < 0.01; the same mean with a wide spread: not."""
    assert paired_lower([1.80, 1.79, 1.81], [1.85, 1.845, 1.855])[1] < 0.01
    assert paired_lower([1.70, 1.89, 1.81], [1.85, 1.845, 1.855])[1] > 0.01
