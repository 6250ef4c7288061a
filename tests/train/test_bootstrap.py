"""train/bootstrap.py: the hierarchical bootstrap against the ordinary bootstrap's known standard error, constant
data, and a seed level that dominates the query noise."""
import math

import numpy as np
import pytest

from mamlen.train.bootstrap import hierarchical_bootstrap


def test_bootstrap_constant_and_single_level():
    flat = [[[0.25] * 5, [0.25] * 9]] * 3
    b = hierarchical_bootstrap(flat, n_boot=200)
    assert (b.mean, b.low, b.high) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25))
    # one seed, one task: the ordinary bootstrap of a mean, whose SE is sd/sqrt(n) (normal interval +-1.96 SE)
    rng = np.random.default_rng(3)
    q = rng.normal(0.1, 1.0, size=400)
    b = hierarchical_bootstrap([[q]], n_boot=4000)
    se = q.std(ddof=0) / math.sqrt(q.size)
    assert b.mean == pytest.approx(q.mean())
    assert (b.high - b.low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.08)


def test_bootstrap_seed_level_dominates():
    # seeds differ by +-1, queries barely vary: the interval spans the seed spread, not the query noise
    rng = np.random.default_rng(4)
    diffs = [[list(m + 1e-3 * rng.normal(size=50)) for _ in range(4)] for m in (-1.0, 0.0, 1.0, 2.0)]
    b = hierarchical_bootstrap(diffs, n_boot=2000)
    assert b.mean == pytest.approx(0.5, abs=1e-3)
    assert b.low < -0.2 and b.high > 1.2
    with pytest.raises(ValueError, match="same"):
        hierarchical_bootstrap([[[1.0, 2.0]], [[1.0]]])
