"""A hierarchical percentile bootstrap of a macro mean difference: resample training seeds, then tasks within
each seed, then queries within each task. The study's report (bench/study.py) uses it over seeds x tasks x
queries; train/meta.py's before/after table over tasks x queries (one "seed": the run itself)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Bootstrap:
    """Percentile interval of the macro mean difference under resampling of seeds, tasks and queries."""
    mean: float
    low: float
    high: float
    n_boot: int
    level: float


def hierarchical_bootstrap(diffs: Sequence[Sequence[Sequence[float]]], n_boot: int = 4000, level: float = 0.95,
                           seed: int = 0, chunk: int = 200) -> Bootstrap:
    """diffs[s][t]: the per-query differences of training seed s on task t (queries may differ in number between
    tasks, not between seeds). The statistic is the mean over seeds of the mean over tasks of the mean over
    queries (the macro score). Each replicate draws seeds with replacement, then tasks with replacement within
    each drawn seed, then queries with replacement within each drawn task."""
    S, T = len(diffs), len(diffs[0])
    if S == 0 or T == 0 or any(len(row) != T for row in diffs):
        raise ValueError(f"hierarchical_bootstrap: need a seeds x tasks grid, got {[len(r) for r in diffs]}")
    nq = np.array([len(q) for q in diffs[0]])
    if any(len(diffs[s][t]) != nq[t] for s in range(S) for t in range(T)) or nq.min() < 1:
        raise ValueError("hierarchical_bootstrap: every seed must have the same (>= 1) queries per task")
    Q = int(nq.max())
    arr = np.zeros((S, T, Q))
    for s in range(S):
        for t in range(T):
            arr[s, t, :nq[t]] = diffs[s][t]
    point = float(np.mean([np.mean([np.mean(q) for q in row]) for row in diffs]))
    rng = np.random.default_rng(seed)
    out = []
    for lo in range(0, n_boot, chunk):
        B = min(chunk, n_boot - lo)
        si = rng.integers(0, S, size=(B, S))                                  # seeds
        ti = rng.integers(0, T, size=(B, S, T))                               # tasks within each seed
        n = nq[ti]                                                            # (B, S, T) queries of each task
        qi = np.floor(rng.random((B, S, T, Q)) * n[..., None]).astype(np.int64)  # queries within each task
        valid = np.arange(Q) < n[..., None]                                   # only the first n draws count
        vals = arr[si[:, :, None, None], ti[..., None], qi]                   # (B, S, T, Q)
        task_means = (vals * valid).sum(-1) / n
        out.append(task_means.mean(axis=(1, 2)))
    reps = np.concatenate(out)
    a = (1 - level) / 2
    return Bootstrap(point, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a)), n_boot, level)
