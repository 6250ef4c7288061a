"""bench/stats.py against known answers: textbook t intervals, hand-counted permutation p-values, Holm's worked
example and G*Power's power figure (the bootstrap: tests/train/test_bootstrap.py)."""
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_stats", Path(__file__).resolve().parents[2] / "bench" / "stats.py")
stats = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = stats
_spec.loader.exec_module(stats)


def test_paired_t_textbook():
    r = stats.paired_t([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5), se sqrt(0.5); t(0.975, 4) = 2.776445 (tables)
    assert (r.n, r.mean) == (5, 3.0)
    assert r.sd == pytest.approx(math.sqrt(2.5)) and r.se == pytest.approx(math.sqrt(0.5))
    assert r.low == pytest.approx(3 - 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert r.high == pytest.approx(3 + 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert r.t == pytest.approx(3 / math.sqrt(0.5))
    # t = 4.2426 on 4 dof lies between the tables' t(0.99) = 3.747 and t(0.995) = 4.604: 0.01 < p < 0.02
    assert 0.01 < r.p < 0.02


def test_paired_t_matches_scipy_on_random_data():
    from scipy import stats as st

    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 30):
        a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
        r, ref = stats.paired_t(b - a), st.ttest_rel(b, a)
        assert r.t == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
        lo, hi = ref.confidence_interval(0.95)
        assert (r.low, r.high) == (pytest.approx(lo), pytest.approx(hi))


def test_paired_t_edges():
    assert stats.paired_t([0.5, 0.5, 0.5]).p == 0.0
    assert stats.paired_t([0.0, 0.0]).p == 1.0
    with pytest.raises(ValueError, match="need >= 2"):
        stats.paired_t([1.0])


def test_sign_flip_exact_by_hand():
    assert stats.sign_flip_p([1, 2, 3, 4]) == pytest.approx(2 / 16)
    # sums of ±1±2±3±4 with |sum| >= 8: 10, 8, -8, -10
    assert stats.sign_flip_p([-1, 2, 3, 4]) == pytest.approx(4 / 16)
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0


def test_sign_flip_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(2)
    d = rng.normal(0.4, 1, size=17)
    signs = np.array(list(itertools.product((1, -1), repeat=17)))
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    assert stats.sign_flip_p(d, n_resamples=40000) == pytest.approx(exact, abs=0.01)


def test_holm_worked_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_power_matches_gpower():
    # G*Power, t test one sample / matched pairs, d = 1, n = 10, alpha 0.05 two-sided: power 0.8030962
    assert stats.paired_power(10, 1.0, 1.0) == pytest.approx(0.8030962, abs=1e-6)
    assert stats.paired_power(10, 2.0, 2.0) == pytest.approx(0.8030962, abs=1e-6)  # only d = effect / sd counts
    assert stats.min_detectable_effect(10, 1.0, power=0.8030962) == pytest.approx(1.0, abs=1e-6)
    # fewer seeds or a stricter alpha: a larger effect is needed
    assert stats.min_detectable_effect(5, 1.0) > stats.min_detectable_effect(10, 1.0)
    assert stats.min_detectable_effect(10, 1.0, alpha=0.01) > stats.min_detectable_effect(10, 1.0)


def test_power_with_few_seeds_and_strict_alpha_is_finite():
    # scipy's noncentral t lower tail is NaN at large noncentrality: the power must still be a number
    for n in (2, 3, 5):
        assert 0 < stats.paired_power(n, 50.0, 1.0, alpha=0.05 / 28) <= 1
        assert math.isfinite(stats.min_detectable_effect(n, 1.0, alpha=0.05 / 28))
