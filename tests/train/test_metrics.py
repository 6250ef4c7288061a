"""Metrics against hand-computed values."""
import math

import pytest

from mamlen.train.metrics import accuracy, argmin_option, macro_f1


def test_accuracy():
    assert accuracy(["a", "b", "c", "a"], ["a", "b", "b", "b"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_macro_f1_hand_computed():
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", "a"]
    # a: TP 1 FP 1 FN 1 -> 2/4; b: TP 2 FP 1 FN 0 -> 4/5; c: TP 0 FP 0 FN 1 -> 0
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_absent_classes():
    # option "d" is neither gold nor predicted: left out of the average (sklearn's default, as MetaICL)
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b", "c", "d"]) == 1.0
    # "b" predicted but never gold: F1 0 for b; a: TP 1 FP 0 FN 1 -> 2/3
    assert macro_f1(["a", "b"], ["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)
    # a constant predictor on a balanced binary set: a: 2/3, b: 0
    assert macro_f1(["a"] * 4, ["a", "a", "b", "b"]) == pytest.approx((2 / 3) / 2)


def test_macro_f1_rejects_unknown_labels():
    with pytest.raises(ValueError, match="prediction 'z' is not among the labels"):
        macro_f1(["z"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="gold label 'q'"):
        macro_f1(["a"], ["q"], ["a", "b"])


def test_argmin_ties_and_nan():
    assert argmin_option([1.0, 0.5, 0.5], ["x", "y", "z"]) == "y"  # tie: the earliest option
    assert argmin_option([2.0, 2.0], ["x", "y"]) == "x"
    assert argmin_option([math.nan, 3.0], ["x", "y"]) == "y"  # NaN never wins
    with pytest.raises(ValueError, match="2 losses for 3 options"):
        argmin_option([1.0, 2.0], ["x", "y", "z"])
