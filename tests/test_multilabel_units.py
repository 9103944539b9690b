"""The multi-label pieces on hand-computed values: thresholds, metrics, loss, caches, keys."""

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import cache_key
from trainer import cache_store
from trainer import multi_label
from trainer import multilabel_metrics
from trainer.data import pipeline

SCORES = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.7], [0.1, 0.4]])
TRUTH = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], np.float32)


def test_thresholds_maximise_each_classs_f1_halfway_to_the_next_score():
    # Class 0: positives score 0.9, 0.8; next lower 0.3 -> 0.55. Class 1: positives 0.7,
    # 0.6 above the negatives 0.4, 0.2 -> halfway between 0.6 and 0.4.
    assert multilabel_metrics.choose_thresholds(SCORES, TRUTH).tolist() == pytest.approx(
        [0.55, 0.5])
    assert multilabel_metrics.choose_thresholds(SCORES, TRUTH, 0.35).tolist() == pytest.approx(
        [0.35, 0.35])
    assert multilabel_metrics.best_f1_threshold([0.2, 0.9], [False, False]) == 0.5


def test_metrics_at_given_thresholds():
    m = multilabel_metrics.multilabel_metrics(SCORES, TRUTH, [0.5, 0.5], ["a", "b"])
    # Predicted: [1,0], [1,1], [0,1], [0,0]: every pair right.
    assert (m["micro_f1"], m["exact_match"], m["hamming_loss"]) == (1.0, 1.0, 0.0)
    m = multilabel_metrics.multilabel_metrics(SCORES, TRUTH, [0.5, 0.35], ["a", "b"])
    # Class b now also fires on image 3 (0.4): 3 hits, 1 false alarm, no miss.
    assert m["hamming_loss"] == pytest.approx(1 / 8)
    assert m["exact_match"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (5 + 4))
    assert m["macro_f1"] == pytest.approx((1.0 + 0.8) / 2)
    assert m["mean_average_precision"] == 1.0


def test_loss_is_mean_binary_cross_entropy_with_smoothing_and_positive_weights():
    logits, labels = tf.constant([[2.0, -1.0]]), tf.constant([[1.0, 0.0]])
    plain = multi_label.MultiLabelCrossentropy()(labels, logits).numpy()
    expected = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    assert plain == pytest.approx(expected, rel=1e-5)
    smoothed = multi_label.MultiLabelCrossentropy(0.2)(labels, logits).numpy()
    keras_bce = tf.keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.2)
    assert smoothed == pytest.approx(keras_bce(labels, logits).numpy(), rel=1e-5)
    weighted = multi_label.MultiLabelCrossentropy(positive_weights=[3.0, 1.0])(
        labels, logits).numpy()
    assert weighted == pytest.approx(np.mean([3 * np.log1p(np.exp(-2.0)),
                                              np.log1p(np.exp(-1.0))]), rel=1e-5)


def test_balanced_positive_weights_are_negatives_over_positives():
    split = pipeline.Split("train", 4, ("a", "b", "c", "d"), (0, 0, 1, 0),
                           label_sets=((0,), (0, 1), (1,), (0, 2)), multi_hot=3)
    info = pipeline.DatasetInfo(("x", "y", "z"), {"train": split})
    assert multi_label.positive_weights(info, "balanced") == (1 / 3, 1.0, 3.0)
    assert multi_label.positive_weights(info, "none") is None


def test_cache_entries_store_k_hot_labels(tmp_path):
    store = cache_store.Store(str(tmp_path))
    key = cache_key.make_key("pooled", "original", "demo_cnn", "w", 32, 6, {"train": "d"})
    writer = store.writer(key, cache_store.part_name(0, 1))
    labels = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    writer.add("train", [np.ones((2, 5), np.float32)], labels)
    entry = writer.publish()
    outputs, read = store.lookup(key, cache_store.part_name(0, 1)).arrays("train")
    assert read.tolist() == labels.tolist() and outputs[0].shape == (2, 5)
    assert entry.labels_shape == (3,)


def test_the_cache_key_covers_the_labels_form(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    single = pipeline.Split("train", 1, (str(path),), (0,), label_sets=((0, 1),))
    k_hot = pipeline.Split("train", 1, (str(path),), (0,), label_sets=((0, 1),), multi_hot=2)
    other = pipeline.Split("train", 1, (str(path),), (0,), label_sets=((0,),), multi_hot=2)
    digests = {cache_key.listing_digest(s) for s in (single, k_hot, other)}
    assert len(digests) == 3


def test_the_export_returns_the_labels_at_or_above_each_classs_threshold(tmp_path):
    """A model of known scores (0.4, 0.6, 0.9 on every image) and thresholds between
    them: labels are the classes at or above their own threshold, best first."""
    from trainer import export
    from trainer import model as model_lib

    model = model_lib.create_model("demo_cnn", 3, 32, 0.0, augment=False, multi_label=True)
    logits = model.get_layer(model_lib.LOGITS_LAYER)
    kernel, _ = logits.get_weights()
    scores = np.array([0.4, 0.6, 0.9], np.float32)
    logits.set_weights([np.zeros_like(kernel), np.log(scores / (1 - scores))])
    folder = export.stage_model(model, ["a", "b", "c"], 32, str(tmp_path / "m"),
                                thresholds=[0.3, 0.7, 0.5])
    outputs = tf.saved_model.load(folder).signatures["serving_images"](
        images=tf.zeros([2, 32, 32, 3]))
    assert outputs["labels"].numpy().tolist() == [[b"c", b"a", b""]] * 2
    assert outputs["label_count"].numpy().tolist() == [2, 2]
    assert outputs["scores"].numpy() == pytest.approx(np.stack([scores] * 2), abs=1e-6)
    assert json.load(open(f"{folder}/thresholds.json")) == pytest.approx(
        {"a": 0.3, "b": 0.7, "c": 0.5})
