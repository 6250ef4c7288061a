"""The study's statistics (issue 13): paired t intervals, sign-flip permutation tests, Holm's correction and the
power of a paired design (the hierarchical bootstrap over training seeds x tasks x queries: train/bootstrap.py).

The unit of replication is the training seed: each seed gives one paired difference (arm − reference, averaged
over tasks and queries), so t intervals have n − 1 degrees of freedom with n = seeds. The bootstrap adds the
sampling of tasks and queries on top of the seeds (it is wider, not a replacement for the t interval).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as st
from scipy.optimize import brentq


@dataclass(frozen=True)
class PairedT:
    """Mean of paired differences with its two-sided t interval (dof = n − 1) and p-value for mean = 0."""
    n: int
    mean: float
    sd: float
    se: float
    low: float
    high: float
    t: float
    p: float
    level: float


def paired_t(d: Sequence[float], level: float = 0.95) -> PairedT:
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        raise ValueError(f"paired_t: need >= 2 differences, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    q = st.t.ppf(0.5 + level / 2, n - 1)
    if se == 0:  # every seed gave the same difference: no spread to test against
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        t = mean / se
        p = float(2 * st.t.sf(abs(t), n - 1))
    return PairedT(n, mean, sd, se, mean - q * se, mean + q * se, t, p, level)


def sign_flip_p(d: Sequence[float], n_resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(d) = 0 by flipping signs (the pairing's null: arm labels are
    exchangeable within a pair). Exact (all 2^n flips) for n <= 16, else Monte Carlo with the +1 correction."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("sign_flip_p: no differences")
    obs = abs(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # ties with the observed sum count as extreme
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        return float(np.mean(np.abs(signs @ d) >= obs - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_resamples, n))
    return float((np.sum(np.abs(signs @ d) >= obs - tol) + 1) / (n_resamples + 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: never below a smaller p's value
        adj[i] = running
    return adj.tolist()


def paired_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t test with n pairs to detect a true mean difference `effect` when the
    differences have standard deviation sd (noncentral t, dof n − 1)."""
    if n < 2 or sd <= 0:
        raise ValueError(f"paired_power: need n >= 2 and sd > 0, got n={n}, sd={sd}")
    dof, nc = n - 1, abs(effect) / sd * math.sqrt(n)
    crit = st.t.ppf(1 - alpha / 2, dof)
    wrong_side = st.nct.cdf(-crit, dof, nc)  # <= alpha/2; scipy returns NaN for it once nc is large
    return float(st.nct.sf(crit, dof, nc) + (wrong_side if math.isfinite(wrong_side) else 0.0))


def min_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference the paired t test detects with the given power (solves paired_power)."""
    hi = sd
    while paired_power(n, hi, sd, alpha) < power:
        hi *= 2
    return float(brentq(lambda e: paired_power(n, e, sd, alpha) - power, 0.0, hi, xtol=1e-12 * hi))
