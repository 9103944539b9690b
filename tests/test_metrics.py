"""Metric arithmetic (trainer/metrics.py) against values computed by hand."""

import json
import math

import numpy as np
import pytest

from trainer import metrics

# Four images, three classes. Image 1 is a confident mistake (true a, predicted b).
PROBABILITIES = np.array([[0.7, 0.2, 0.1],    # a, right, 0.7
                          [0.1, 0.9, 0.0],    # a, wrong (b), 0.9
                          [0.1, 0.8, 0.1],    # b, right, 0.8
                          [0.3, 0.3, 0.4]])   # c, right, 0.4
LABELS = np.array([0, 0, 1, 2])
NAMES = ["a", "b", "c"]


def test_per_class_metrics_match_hand_computed_values():
    # Rows true, columns predicted.
    confusion = np.array([[5, 1, 0],
                          [2, 3, 1],
                          [0, 0, 0]])
    per_class = metrics.per_class_metrics(confusion, ["a", "b", "c"])
    assert per_class["a"] == pytest.approx(
        {"precision": 5 / 7, "recall": 5 / 6, "f1": 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6),
         "support": 6})
    assert per_class["b"]["precision"] == pytest.approx(3 / 4)
    assert per_class["b"]["recall"] == pytest.approx(3 / 6)
    # Never true, predicted once: precision 0/1; recall undefined -> 0.
    assert per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize("scores, positive, expected", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),        # All tied: chance.
    ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),      # One tie counts a half.
])
def test_roc_auc_is_the_chance_a_positive_outscores_a_negative(scores, positive, expected):
    assert metrics.roc_auc(np.array(scores), np.array(positive)) == pytest.approx(expected)


def test_roc_auc_is_none_with_one_class_only():
    assert metrics.roc_auc(np.array([0.2, 0.7]), np.array([1, 1])) is None


def test_classification_metrics_report_binary_auc_and_per_class_scores():
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0])
    result = metrics.classification_metrics(probabilities, labels, ["cat", "dog"])
    assert result["accuracy"] == 0.5
    assert result["confusion_matrix"] == [[1, 1], [1, 1]]
    assert result["roc_auc"] == pytest.approx(0.5)
    assert set(result["per_class"]) == {"cat", "dog"}
    assert result["macro_avg"]["f1"] == pytest.approx(0.5)
    json.dumps(result)  # JSON-ready: plain floats and ints only.

    three = metrics.classification_metrics(
        np.array([[0.8, 0.1, 0.1]]), np.array([0]), ["a", "b", "c"])
    assert "roc_auc" not in three


def test_average_precision_per_class_groups_tied_scores():
    # Class a: scores .7+ .3- .1+ .1- (tie). Thresholds .7: P 1, R 1/2; .3: P 1/2, R 1/2;
    # .1: P 2/4, R 1. AP = 1/2 * 1 + 0 + 1/2 * 1/2 = 0.75 (counting the tie as two
    # thresholds, + first, would give 0.833).
    ap = metrics.average_precisions(PROBABILITIES, LABELS, NAMES)
    assert ap["per_class"]["a"] == pytest.approx(0.75)
    assert ap["per_class"]["b"] == pytest.approx(0.5)   # .9- then .8+: P 1/2 at R 1.
    assert ap["per_class"]["c"] == pytest.approx(1.0)   # Its positive scores highest.
    assert ap["macro"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # Micro: the 12 pairs pooled; the 4 positives reached at .8 (P 1/2), .7 (P 2/3),
    # .4 (P 3/4) and .1 (P 4/11), each adding 1/4 of recall.
    assert ap["micro"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 11) / 4)


def test_average_precision_is_none_without_positives():
    assert metrics.average_precision(np.array([0.2, 0.4]), np.array([0, 0])) is None


def test_threshold_table_per_class_and_micro():
    table = metrics.threshold_table(PROBABILITIES, LABELS, NAMES)
    assert table["threshold"] == [round(0.01 * k, 2) for k in range(100)]
    at = {t: k for k, t in enumerate(table["threshold"])}
    a = table["per_class"]["a"]
    # >= 0: all four predicted a, two of them are.
    assert (a["precision"][at[0.0]], a["recall"][at[0.0]]) == pytest.approx((0.5, 1.0))
    # >= 0.3 takes .7 (a) and .3 (c): the threshold itself counts.
    assert (a["precision"][at[0.3]], a["recall"][at[0.3]]) == pytest.approx((0.5, 0.5))
    assert (a["precision"][at[0.5]], a["recall"][at[0.5]]) == pytest.approx((1.0, 0.5))
    assert a["f1"][at[0.5]] == pytest.approx(2 * 0.5 / 1.5)
    # Nothing predicted: precision 0 by the zero-denominator rule.
    assert (a["precision"][at[0.75]], a["recall"][at[0.75]]) == (0.0, 0.0)
    micro = table["micro"]
    assert (micro["precision"][at[0.0]], micro["recall"][at[0.0]]) == pytest.approx((1 / 3, 1))
    # >= .35: the pairs .9 (wrong), .8, .7, .4 (right).
    assert (micro["precision"][at[0.35]], micro["recall"][at[0.35]]) == pytest.approx((.75, .75))
    assert (micro["precision"][at[0.95]], micro["recall"][at[0.95]]) == (0.0, 0.0)
    assert all(len(column) == 100 for column in micro.values())


def test_expected_calibration_error():
    # 15 bins: each image alone in its bin: mean |right - confidence|.
    assert metrics.expected_calibration_error(PROBABILITIES, LABELS) == pytest.approx(
        (0.3 + 0.9 + 0.2 + 0.6) / 4)
    # 2 bins: (.5, 1] holds .7, .9, .8 (2 of 3 right, mean .8): 3 * |2/3 - .8| = 0.4;
    # (0, .5] holds .4 (right): 0.6. ECE = (0.4 + 0.6) / 4.
    assert metrics.expected_calibration_error(PROBABILITIES, LABELS, bins=2) == pytest.approx(
        0.25)
    # Perfectly calibrated: confidence 1 and always right.
    assert metrics.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_top_k_accuracy_counts_a_tie_at_the_boundary_as_in():
    assert metrics.top_k_accuracy(PROBABILITIES, LABELS, 1) == pytest.approx(0.75)
    assert metrics.top_k_accuracy(PROBABILITIES, LABELS, 2) == pytest.approx(1.0)
    assert metrics.top_k_accuracy(np.array([[0.4, 0.4, 0.2]]), np.array([1]), 1) == 1.0
    assert metrics.top_k_accuracy(np.array([[0.5, 0.3, 0.2]]), np.array([2]), 2) == 0.0


def test_log_loss_and_worst_mistakes():
    assert metrics.log_loss(PROBABILITIES, LABELS) == pytest.approx(
        -(math.log(0.7) + math.log(0.1) + math.log(0.8) + math.log(0.4)) / 4)
    # A zero probability of the true class is clipped, not infinite.
    assert metrics.log_loss(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(
        -math.log(1e-7))
    wrong = np.array([[0.6, 0.4], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]])
    assert metrics.worst_mistakes(wrong, np.array([1, 0, 0, 0]), count=2) == [1, 2]


def test_classification_metrics_carry_the_new_keys_and_top_5_past_five_classes():
    result = metrics.classification_metrics(PROBABILITIES, LABELS, NAMES)
    assert result["log_loss"] == result["loss"]
    assert {"expected_calibration_error", "average_precision",
            "confidence_thresholds"} <= set(result)
    assert "top_5_accuracy" not in result
    six = np.full((2, 6), 0.1) + np.array([[0.5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.5]])
    result = metrics.classification_metrics(six, np.array([0, 1]), list("uvwxyz"))
    # Image 1: its class (0.1) ties four others below 0.6: fewer than 5 score higher.
    assert result["top_5_accuracy"] == 1.0
    json.dumps(result)
