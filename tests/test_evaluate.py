"""Evaluation: metric arithmetic on known arrays, and the CLI over a finished job."""

import glob
import json

import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl import flags

from trainer import evaluate
from trainer.data import pipeline


def test_per_class_metrics_match_hand_computed_values():
    # Rows true, columns predicted.
    confusion = np.array([[5, 1, 0],
                          [2, 3, 1],
                          [0, 0, 0]])
    per_class = evaluate.per_class_metrics(confusion, ["a", "b", "c"])
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
    assert evaluate.roc_auc(np.array(scores), np.array(positive)) == pytest.approx(expected)


def test_roc_auc_is_none_with_one_class_only():
    assert evaluate.roc_auc(np.array([0.2, 0.7]), np.array([1, 1])) is None


def test_classification_metrics_report_binary_auc_and_per_class_scores():
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0])
    metrics = evaluate.classification_metrics(probabilities, labels, ["cat", "dog"])
    assert metrics["accuracy"] == 0.5
    assert metrics["confusion_matrix"] == [[1, 1], [1, 1]]
    assert metrics["roc_auc"] == pytest.approx(0.5)
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert metrics["macro_avg"]["f1"] == pytest.approx(0.5)
    json.dumps(metrics)  # JSON-ready: plain floats and ints only.

    three = evaluate.classification_metrics(
        np.array([[0.8, 0.1, 0.1]]), np.array([0]), ["a", "b", "c"])
    assert "roc_auc" not in three


def _parse(define, argv):
    flag_values = flags.FlagValues()
    define(flag_values)
    flag_values(["prog"] + argv)
    return flag_values


def test_cli_reproduces_the_jobs_test_metrics_and_writes_tensorboard(finished_job, tmp_path):
    config, metrics = finished_job
    output, log_dir = tmp_path / "eval.json", tmp_path / "logs"
    results = evaluate.run(_parse(evaluate.define_flags, [
        f"--model={config.model_dir}", f"--data_dir={config.data_dir}",
        "--splits=validation,test", f"--output={output}", f"--log_dir={log_dir}"]))

    with open(output) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    for split in ("validation", "test"):
        assert results[split]["confusion_matrix"] == metrics[split]["confusion_matrix"]
        assert results[split]["loss"] == pytest.approx(metrics[split]["loss"], rel=1e-5)
    assert set(results["test"]["per_class"]) == set(metrics["class_names"])

    tags = set()
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {value.tag for value in event.summary.value}
    assert {"test/accuracy", "test/macro_f1", "confusion_matrix/test", "predictions/test",
            "_hparams_/session_start_info"} <= tags


def test_prediction_grid_samples_every_class_of_a_class_ordered_split(finished_job):
    config, metrics = finished_job
    test = pipeline.describe(config.data_dir).splits["test"]  # Two per class, by class.
    images, labels, probabilities = evaluate.sample_predictions(
        config.model_dir, test, config.image_size, count=4, num_classes=4)
    assert labels.tolist() == [0, 1, 2, 3]
    assert images.shape == (4, config.image_size, config.image_size, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_cli_refuses_data_with_other_classes(finished_job, shapes_dir):
    config, _ = finished_job
    with pytest.raises(app.UsageError, match="classes"):
        evaluate.run(_parse(evaluate.define_flags, [
            f"--model={config.model_dir}", f"--data_dir={shapes_dir}", "--splits=validation"]))
