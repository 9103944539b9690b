"""A multi-label model's decision thresholds: chosen on validation, saved with the model.

After training, the trained Keras model scores the validation split (each
class's sigmoid) and ``multilabel_metrics.choose_thresholds`` picks each
class's threshold of best F1, or ``--multi_label_threshold`` for every class.
The export saves them twice (trainer/export.py): as the SavedModel's
``thresholds`` variable, which its signatures apply to return ``labels``, and
as ``thresholds.json`` (``{class name: threshold}``) beside it, which
trainer.evaluate and the metrics read. A class is predicted when its score
is >= its threshold.
"""

import json
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import multilabel_metrics
from trainer.data import pipeline

FILE = "thresholds.json"
_BATCH = 64


def scores_and_truth(model: keras.Model, split: pipeline.Split, image_size: int):
    """(sigmoid scores [n, k], k-hot truth [n, k]) of a multi-label split by a Keras model."""
    dataset = pipeline.make_dataset(split, image_size, _BATCH, training=False, cache="none")
    scores, truth = [], []
    for images, labels in dataset:
        logits = model(tf.cast(images, tf.float32), training=False)
        scores.append(tf.sigmoid(tf.cast(logits, tf.float32)).numpy())
        truth.append(labels.numpy())
    return np.concatenate(scores), np.concatenate(truth)


def choose(model: keras.Model, validation: pipeline.Split, config) -> np.ndarray:
    """float32 [k]: the thresholds for ``model`` (``config``: its run's Config), logged."""
    scores, truth = scores_and_truth(model, validation, config.image_size)
    chosen = multilabel_metrics.choose_thresholds(scores, truth, config.multi_label_threshold)
    how = (f"--multi_label_threshold={config.multi_label_threshold:g} for every class"
           if config.multi_label_threshold is not None
           else f"best F1 per class on {validation.count} validation images")
    logging.info("Multi-label thresholds (%s): %s.", how,
                 ", ".join(f"{t:.3f}" for t in chosen))
    return chosen


def write(folder: str, class_names: Sequence[str], thresholds: Sequence[float]) -> None:
    """``thresholds.json`` in a model folder: {class name: threshold}."""
    with tf.io.gfile.GFile(f"{folder}/{FILE}", "w") as f:
        json.dump({name: float(t) for name, t in zip(class_names, thresholds)}, f, indent=2)


def read(model_dir: str) -> Optional[Dict[str, float]]:
    """{class name: threshold} of an exported model folder, or None (single-label)."""
    path = f"{model_dir.rstrip('/')}/{FILE}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)
