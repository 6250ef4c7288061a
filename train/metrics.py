"""Scores of the evaluation protocol: macro-F1 for classification tasks, accuracy otherwise (MetaICL).

macro_f1 follows sklearn's `f1_score(golds, preds, average="macro")` as MetaICL calls it: the average
runs over the classes that occur in the golds or the predictions; a class that is predicted but never
gold (or gold but never predicted) contributes F1 = 0; options that occur in neither are left out.
"""
from __future__ import annotations

import math
from typing import Sequence


def _check(preds: Sequence[str], golds: Sequence[str]) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    if not golds:
        raise ValueError("no predictions to score")


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of exact matches."""
    _check(preds, golds)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def macro_f1(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), classes = those in golds ∪ preds.

    `labels`, if given, is the task's option set: every prediction and gold must be one of them.
    """
    _check(preds, golds)
    if labels is not None:
        allowed = set(labels)
        for name, seq in (("prediction", preds), ("gold label", golds)):
            bad = [x for x in seq if x not in allowed]
            if bad:
                raise ValueError(f"{name} {bad[0]!r} is not among the labels {sorted(allowed)}")
    classes = sorted(set(preds) | set(golds))
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: c occurs in preds or golds
    return sum(f1s) / len(f1s)


def argmin_option(losses: Sequence[float], options: Sequence[str]) -> str:
    """The option with the lowest loss; ties go to the earliest option (deterministic, like np.argmin)."""
    if len(losses) != len(options) or not options:
        raise ValueError(f"{len(losses)} losses for {len(options)} options")
    # NaN counts as +inf, so a broken score never wins
    best = min(range(len(options)), key=lambda i: (math.inf if math.isnan(losses[i]) else losses[i], i))
    return options[best]
