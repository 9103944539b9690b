"""Metrics of an exported model on a split, computed outside any strategy.

The final numbers of a run come from the exported SavedModel itself, read
back with plain TensorFlow: they describe exactly what will be served, and
they need no collective ops, so only the chief computes them.
"""

import json
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from trainer.data import pipeline


def predict_split(model_dir: str, split: pipeline.Split, image_size: int,
                  batch_size: int = 64):
    """Probabilities [n, classes] and labels [n] of a split, by the served model."""
    serve = tf.saved_model.load(model_dir).signatures["serving_images"]
    dataset = pipeline.make_dataset(split, image_size, batch_size, training=False, cache="none")
    probabilities, labels = [], []
    for images, batch_labels in dataset:
        probabilities.append(serve(images=images)["probabilities"].numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> Dict:
    """Accuracy, cross-entropy loss, count and confusion matrix (rows: true class)."""
    predicted = probabilities.argmax(axis=-1)
    true_probability = probabilities[np.arange(len(labels)), labels]
    confusion = np.zeros((len(class_names), len(class_names)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    return {
        "count": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(np.clip(true_probability, 1e-7, 1.0)).mean()),
        "confusion_matrix": confusion.tolist(),
    }


def evaluate_splits(model_dir: str, info: pipeline.DatasetInfo, image_size: int,
                    splits: Sequence[str] = ("validation", "test")) -> Dict:
    """Metrics for each named split present in ``info``."""
    results = {"class_names": list(info.class_names)}
    for name in splits:
        if name in info.splits and info.splits[name].count:
            probabilities, labels = predict_split(model_dir, info.splits[name], image_size)
            results[name] = classification_metrics(probabilities, labels, info.class_names)
    return results


def write_metrics(metrics: Dict, path: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
