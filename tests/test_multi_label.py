"""Multi-label classification end to end, on tests/multilabel_data.py's generated task.

One module-scoped job trains on a JSONL import file of 32-px images holding
1-3 of 4 coloured shapes (--task=auto picks multi-label), exports and
evaluates; the tests read what it left behind. A run on shuffled train labels
misses the learning bar, which is how the bar is known to have a margin.
"""

import json
import random

import numpy as np
import pytest
import tensorflow as tf

import multilabel_data
from conftest import tiny_config
from trainer import artifacts
from trainer import cluster
from trainer import evaluate
from trainer import export
from trainer import multi_label
from trainer import multilabel_metrics
from trainer import predict
from trainer import tflite
from trainer import thresholds as thresholds_lib
from trainer import train
from trainer.data import pipeline
from trainer.data import prepare as prepare_lib

SETTINGS = dict(backbone="demo_cnn", fine_tune_at=6, image_size=32, batch_size=8, epochs=16,
                fine_tune_epochs=8, learning_rate=3e-2, fine_tune_learning_rate=3e-3,
                weights="none", seed=0)
MARGIN = 0.15  # Micro F1 above the best label-frequency baseline that counts as learned.
KEYS = ("micro_f1", "macro_f1", "mean_average_precision", "exact_match", "hamming_loss")


def _train(import_file, job_dir, **overrides):
    config = tiny_config(import_file, job_dir, **{**SETTINGS, **overrides})
    return config, train.train_and_evaluate(config, cluster.create_strategy("one_device"))


@pytest.fixture(scope="module")
def import_file(tmp_path_factory):
    return multilabel_data.write_import_file(str(tmp_path_factory.mktemp("multilabel")))


@pytest.fixture(scope="module")
def multilabel_job(import_file, tmp_path_factory):
    """(config, metrics) of one trained multi-label job (--task=auto)."""
    return _train(import_file, tmp_path_factory.mktemp("ml_job") / "job")


def _bar(import_file) -> float:
    """MARGIN above the better of two predictors that know only the label frequencies:
    every class on every image, or each class at random at its train frequency."""
    info = pipeline.describe(import_file).with_task(True)
    train_truth, test_truth = info.splits["train"].k_hot(), info.splits["test"].k_hot()
    everything = multilabel_metrics.multilabel_metrics(
        np.ones_like(test_truth), test_truth, [0.5] * 4, info.class_names)["micro_f1"]
    frequency = multilabel_metrics.frequency_baseline_micro_f1(train_truth, test_truth)
    return max(everything, frequency) + MARGIN


def test_a_short_run_learns_above_the_label_frequency_baseline(multilabel_job, import_file):
    config, metrics = multilabel_job
    with open(f"{config.job_dir}/config.json") as f:
        assert json.load(f)["task"] == "multi_label"  # --task=auto, resolved.
    assert config.task == "auto" and metrics["task"] == "multi_label"
    bar = _bar(import_file)
    assert 0.8 < bar < 0.85  # Predicting every class scores about 0.67 here.
    for split in ("validation", "test"):
        assert set(KEYS) <= set(metrics[split])
        assert metrics[split]["micro_f1"] >= bar, (split, metrics[split]["micro_f1"], bar)
    # What a tuning study can maximise (--hypertune_metric reads the epoch logs).
    assert {"val_micro_f1", "val_mean_average_precision"} <= set(metrics["history"])
    per_class = metrics["test"]["per_class"]
    assert set(per_class) == set(multilabel_data.CLASSES)
    assert {"precision", "recall", "f1", "average_precision", "threshold"} <= set(
        per_class["red"])


def test_shuffled_train_labels_miss_the_bar(import_file, tmp_path):
    """The control: the same run on train label sets permuted among the images."""
    shuffled = multilabel_data.write_import_file(str(tmp_path / "data"), shuffle_labels=True)
    _, metrics = _train(shuffled, tmp_path / "job")
    assert metrics["test"]["micro_f1"] < _bar(import_file), metrics["test"]["micro_f1"]


def test_thresholds_read_back_from_the_export_equal_metrics_json(multilabel_job):
    config, metrics = multilabel_job
    model_dir = export.resolve_model_dir(config.model_dir)
    with open(f"{config.job_dir}/metrics.json") as f:
        saved = json.load(f)
    assert saved["thresholds"] == metrics["thresholds"]
    assert thresholds_lib.read(model_dir) == pytest.approx(saved["thresholds"])
    class_names = export.read_class_names(model_dir)
    variable = tf.saved_model.load(model_dir).thresholds.numpy()
    assert variable.tolist() == pytest.approx([saved["thresholds"][n] for n in class_names])
    assert len(set(saved["thresholds"].values())) > 1  # Chosen per class, not one default.


def test_predict_returns_every_label_of_an_image_with_several_shapes(multilabel_job, tmp_path):
    config, _ = multilabel_job
    wanted = ("blue", "red", "yellow")
    paths = []
    for seed in range(3):
        path = tmp_path / f"three_{seed}.jpg"
        path.write_bytes(multilabel_data.image(wanted, 32, random.Random(seed)))
        paths.append(str(path))
    results = list(predict.predict_files(config.model_dir, paths, top_k=4))
    thresholds = thresholds_lib.read(export.resolve_model_dir(config.model_dir))
    for result in results:
        labels = [label["label"] for label in result["labels"]]
        above = [c["label"] for c in result["top_k"]
                 if c["probability"] >= thresholds[c["label"]]]
        assert labels == above  # Every label at or above its threshold, best first.
        assert len(labels) >= 2 and set(labels) <= set(wanted), result
    line = predict.format_result(results[0])
    assert line == f"{paths[0]}: " + ", ".join(
        f"{c['label']} ({c['score']:.3f})" for c in results[0]["labels"])


def test_signature_labels_are_padded_names_above_thresholds(multilabel_job):
    config, _ = multilabel_job
    serve = tf.saved_model.load(export.resolve_model_dir(config.model_dir)).signatures[
        "serving_images"]
    outputs = serve(images=tf.random.uniform([3, 32, 32, 3], 0, 255, seed=1))
    scores, labels = outputs["scores"].numpy(), outputs["labels"].numpy()
    names = [n.decode() for n in outputs["class_names"].numpy()[0]]
    assert labels.shape == scores.shape == (3, 4)
    for row, row_labels, count, thresholds in zip(scores, labels, outputs["label_count"].numpy(),
                                                  outputs["thresholds"].numpy()):
        expected = [names[k] for k in np.argsort(-row) if row[k] >= thresholds[k]]
        assert [n.decode() for n in row_labels] == expected + [""] * (4 - len(expected))
        assert count == len(expected)


def test_evaluate_reproduces_the_jobs_metrics(multilabel_job, import_file):
    config, metrics = multilabel_job
    results = evaluate.evaluate_model(config.model_dir, import_file, splits=("test",))
    assert results["task"] == "multi_label"
    assert results["thresholds"] == pytest.approx(metrics["thresholds"])
    for key in KEYS:
        assert results["test"][key] == pytest.approx(metrics["test"][key], abs=1e-6)


def test_tensorboard_has_a_pr_curve_per_class(multilabel_job):
    config, _ = multilabel_job
    tags = set()
    for path in tf.io.gfile.glob(f"{config.log_dir}/evaluation/events.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {value.tag for value in event.summary.value}
    assert {f"pr_curve/test/{name}" for name in multilabel_data.CLASSES} <= tags
    assert {"test/micro_f1", "test/mean_average_precision"} <= tags


def test_tflite_float_model_gives_the_savedmodels_labels(multilabel_job, import_file,
                                                         tmp_path):
    """The multi-label export converts; its TFLite runtime's thresholded labels agree,
    and trainer/artifacts.py measures it on those labels."""
    config, metrics = multilabel_job
    model_dir = export.resolve_model_dir(config.model_dir)
    test = pipeline.describe(import_file).with_task(True).splits["test"]
    images = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(
        test, 32, 64, training=False, cache="none")]).astype(np.float32)
    path = tmp_path / "model_float.tflite"
    path.write_bytes(tflite.convert(model_dir, tflite.FLOAT))
    scores = tflite.classify(str(path), images)
    measured = artifacts.measure(model_dir, {"tflite_float": str(path)}, test, 32)["artifacts"]
    assert measured["saved_model"]["micro_f1"] == pytest.approx(metrics["test"]["micro_f1"])
    assert measured["tflite_float"]["agreement"] >= 0.95
    assert measured["tflite_float"]["label_agreement"] >= 0.99
    reference = tf.saved_model.load(model_dir).signatures["serving_images"](
        images=tf.constant(images))["scores"].numpy()
    thresholds = tf.saved_model.load(model_dir).thresholds.numpy()
    assert np.abs(scores - reference).max() < 1e-4
    assert ((scores >= thresholds) == (reference >= thresholds)).mean() > 0.99


def test_task_auto_reads_the_training_labels(import_file, colour_dir):
    assert pipeline.describe(import_file).has_multi_label
    assert not pipeline.describe(colour_dir).has_multi_label  # Image folders: single-label.
    assert multi_label.resolve_task("auto", True, "d") == "multi_label"
    assert multi_label.resolve_task("auto", False, "d") == "single_label"
    assert multi_label.resolve_task("multi_label", False, "d") == "multi_label"
    with pytest.raises(pipeline.DataError, match="several labels"):
        multi_label.resolve_task("single_label", True, "d")


def test_prepared_records_keep_label_sets_and_old_records_read_one_hot(
        import_file, colour_dir, tmp_path):
    options = prepare_lib.Options(min_shards=1, workers=1, progress=False)
    assert prepare_lib.prepare(import_file, str(tmp_path / "ml"), options).ok
    listed = pipeline.describe(import_file).with_task(True).splits["validation"]
    records = pipeline.describe(str(tmp_path / "ml"))
    assert records.has_multi_label
    k_hot = _labels(records.with_task(True).splits["validation"])
    by_row = sorted(map(tuple, k_hot.tolist()))
    assert by_row == sorted(map(tuple, listed.k_hot().tolist()))
    # Records without image/class/labels (single-label, as older trainers wrote them).
    assert prepare_lib.prepare(colour_dir, str(tmp_path / "single"), options).ok
    single = pipeline.describe(str(tmp_path / "single")).with_task(True).splits["validation"]
    one_hot = _labels(single)
    assert one_hot.sum(axis=1).tolist() == [1.0] * single.count
    assert sorted(one_hot.argmax(axis=1).tolist()) == sorted(
        _labels(pipeline.describe(str(tmp_path / "single")).splits["validation"]).tolist())


def _labels(split):
    return np.concatenate([y.numpy() for _, y in pipeline.make_dataset(
        split, 32, 64, training=False, cache="none")])
