"""The multi-label task: deciding it (``--task``), its loss, epoch metrics and label weights.

A multi-label model has one logit per class, each read through a sigmoid:
an image may hold any number of the classes. It trains on k-hot label
vectors (trainer/data/pipeline.py) with binary cross-entropy from logits,
averaged over the classes:

* label smoothing ``s`` trains towards ``y(1 - s) + s/2`` for every class,
  as Keras's BinaryCrossentropy does;
* ``--class_weighting=balanced`` weighs each class's positive term by
  ``n_negative / n_positive`` of the train split (``pos_weight`` of
  ``tf.nn.weighted_cross_entropy_with_logits``, PyTorch's
  BCEWithLogitsLoss ``pos_weight``): a rare label's misses cost as much in
  all as its false alarms.

Epoch metrics (what ``fit`` logs and ``--hypertune_metric`` can report as
``val_micro_f1`` or ``val_mean_average_precision``): ``accuracy`` (per
label, at probability 0.5), ``micro_f1`` at 0.5, and
``mean_average_precision`` (the PR-curve area per class, averaged; Keras's
interpolated AUC). The final metrics, at the thresholds chosen on
validation, are trainer/multilabel_metrics.py's.
"""

import json
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer.data import sources

AUTO, SINGLE_LABEL, MULTI_LABEL = "auto", "single_label", "multi_label"
TASKS = (AUTO, SINGLE_LABEL, MULTI_LABEL)


class TaskError(sources.DataError):
    """The data cannot be trained for the task asked."""


def resolve_task(task: str, has_multi_label: bool, data_dir: str) -> str:
    """``single_label`` or ``multi_label``: ``auto`` picks multi-label when some training
    image has several labels, and the choice is logged.

    Raises:
      TaskError: ``single_label`` asked for data whose images have several labels.
    """
    if task not in TASKS:
        raise TaskError(f"--task={task!r} must be one of {list(TASKS)}.")
    if task == SINGLE_LABEL and has_multi_label:
        raise TaskError(f"--task=single_label, but training images of {data_dir} have "
                        "several labels; use --task=multi_label (or auto).")
    if task == AUTO:
        task = MULTI_LABEL if has_multi_label else SINGLE_LABEL
        logging.info("--task=auto: %s (%s).", task,
                     "some training images have several labels" if has_multi_label
                     else "every training image has one label")
    return task


def positive_weights(data, mode: str) -> Optional[Tuple[float, ...]]:
    """Per class, ``n_negative / n_positive`` of the train split (a multi-label
    ``pipeline.DatasetInfo``) for ``mode='balanced'``; None for ``'none'``.

    Image files count their label sets; prepared records their manifest's
    per-class counts (a multi-label record counts in each of its classes).
    """
    if mode == "none":
        return None
    train = data.splits["train"]
    if train.is_records:
        with tf.io.gfile.GFile(train.manifest) as f:
            counts = json.load(f)["splits"]["train"]["classes"]
        positives = np.asarray([counts.get(name, 0) for name in data.class_names], np.float64)
    else:
        positives = train.k_hot().sum(axis=0).astype(np.float64)
    negatives = train.count - positives
    weights = tuple(float(n / max(p, 1.0)) for n, p in zip(negatives, positives))
    logging.info("Positive weights (balanced, from train label counts %s): %s.",
                 ", ".join(f"{c}: {int(p)}" for c, p in zip(data.class_names, positives)),
                 ", ".join(f"{w:.3g}" for w in weights))
    return weights


class MultiLabelCrossentropy(keras.losses.Loss):
    """Binary cross-entropy from logits over k-hot labels, mean over the classes,
    with label smoothing and per-class positive weights."""

    def __init__(self, label_smoothing: float = 0.0,
                 positive_weights: Optional[Sequence[float]] = None,
                 name: str = "multi_label_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing
        self.positive_weights = list(positive_weights) if positive_weights else None

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.float32)
        labels = tf.cast(y_true, tf.float32)
        labels = labels * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.positive_weights is None:
            losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        else:
            losses = tf.nn.weighted_cross_entropy_with_logits(
                labels=labels, logits=logits,
                pos_weight=tf.constant(self.positive_weights, tf.float32))
        return tf.reduce_mean(losses, axis=-1)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "positive_weights": self.positive_weights}


class MicroF1(keras.metrics.Metric):
    """F1 over every (image, class) pair, a class predicted when its logit is > 0."""

    def __init__(self, name: str = "micro_f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.true_positives = self.add_weight("true_positives", initializer="zeros")
        self.predicted = self.add_weight("predicted", initializer="zeros")
        self.actual = self.add_weight("actual", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight  # Counts, as the final metrics count.
        truth = tf.cast(y_true > 0.5, tf.float32)
        predicted = tf.cast(y_pred > 0.0, tf.float32)
        self.true_positives.assign_add(tf.reduce_sum(truth * predicted))
        self.predicted.assign_add(tf.reduce_sum(predicted))
        self.actual.assign_add(tf.reduce_sum(truth))

    def result(self):
        return tf.math.divide_no_nan(2.0 * self.true_positives, self.predicted + self.actual)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(0.0)


def loss_and_metrics(num_classes: int, label_smoothing: float = 0.0,
                     positive_weights: Optional[Sequence[float]] = None):
    """(loss, epoch metrics) for a multi-label head of ``num_classes`` logits."""
    return (MultiLabelCrossentropy(label_smoothing, positive_weights),
            [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"), MicroF1(),
             keras.metrics.AUC(curve="PR", multi_label=True, num_labels=num_classes,
                               from_logits=True, name="mean_average_precision")])
