"""Evaluation: the CLI over a finished job, its TensorBoard summaries and pictures."""

import glob
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from absl import app
from absl import flags

from trainer import evaluate
from trainer.data import pipeline


def _parse(define, argv):
    flag_values = flags.FlagValues()
    define(flag_values)
    flag_values(["prog"] + argv)
    return flag_values


def test_cli_reproduces_the_jobs_test_metrics_and_writes_tensorboard(finished_job, tmp_path):
    config, metrics = finished_job
    output, log_dir, png = tmp_path / "eval.json", tmp_path / "logs", tmp_path / "mistakes.png"
    results = evaluate.run(_parse(evaluate.define_flags, [
        f"--model={config.model_dir}", f"--data_dir={config.data_dir}",
        "--splits=validation,test", f"--output={output}", f"--log_dir={log_dir}",
        f"--mistakes_png={png}"]))

    with open(output) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    for split in ("validation", "test"):
        assert results[split]["confusion_matrix"] == metrics[split]["confusion_matrix"]
        assert results[split]["loss"] == pytest.approx(metrics[split]["loss"], rel=1e-5)
        assert (results[split]["confidence_thresholds"]["micro"]["recall"]
                == pytest.approx(metrics[split]["confidence_thresholds"]["micro"]["recall"]))
    assert set(results["test"]["per_class"]) == set(metrics["class_names"])

    tags, pr_curves = set(), {}
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
                if value.metadata.plugin_data.plugin_name == "pr_curves":
                    pr_curves[value.tag] = tf.make_ndarray(value.tensor)
    assert {"test/accuracy", "test/macro_f1", "test/log_loss", "test/expected_calibration_error",
            "test/average_precision_micro", "confusion_matrix/test", "predictions/test",
            "worst_mistakes/test", "_hparams_/session_start_info"} <= tags
    # One PR curve per class and split; rows TP, FP, TN, FN, precision, recall at
    # thresholds 0, 0.01, ..., 1: at threshold 0 every image is predicted, so TP is
    # the class's support.
    assert set(pr_curves) == {f"pr_curve/{split}/{name}" for split in ("validation", "test")
                              for name in metrics["class_names"]}
    for name in metrics["class_names"]:
        curve = pr_curves[f"pr_curve/test/{name}"]
        assert curve.shape == (6, evaluate.PR_CURVE_THRESHOLDS)
        assert curve[0, 0] == results["test"]["per_class"][name]["support"]
        assert curve[0, 0] + curve[1, 0] == results["test"]["count"]


def test_worst_mistakes_are_listed_and_drawn(finished_job):
    config, metrics = finished_job
    mistakes = metrics["test"]["worst_mistakes"]
    wrong = metrics["test"]["count"] - np.trace(metrics["test"]["confusion_matrix"])
    assert len(mistakes) == min(wrong, evaluate.NUM_MISTAKES) > 0
    scores = [m["score"] for m in mistakes]
    assert scores == sorted(scores, reverse=True)
    test = pipeline.describe(config.data_dir).splits["test"]
    for m in mistakes:
        assert m["true"] != m["predicted"]
        assert m["path"] == test.paths[m["index"]]
        assert metrics["class_names"][test.labels[m["index"]]] == m["true"]
    # The job left the grid as a PNG: one tile per mistake (4 columns).
    with Image.open(f"{config.job_dir}/{evaluate.MISTAKES_FILE}") as png:
        rows = -(-len(mistakes) // 4)
        assert png.format == "PNG" and png.height > rows * 112


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
