"""Metrics of an exported model on a split: JSON, TensorBoard pictures, hparams; a CLI.

The final numbers of a run come from the exported SavedModel itself, read
back with plain TensorFlow: they describe exactly what will be served, and
they need no collective ops, so only the chief computes them.

For each split: count, accuracy, balanced accuracy (mean per-class recall),
macro F1, cross-entropy loss, per-class precision,
recall and F1 (with their macro average), the confusion matrix (rows: true
class) and, with two classes, ROC AUC for the second class. The TensorBoard
summaries (one run, e.g. ``logs/evaluation``) hold those numbers as scalars,
a confusion-matrix image, a grid of sample predictions and an hparams entry,
so the run shows up in TensorBoard's HParams dashboard with its results.

Command line, over any exported model and data folder::

    python -m trainer.evaluate --model=job/model --data_dir=data \
        [--splits=test] [--output=eval.json] [--log_dir=job/logs/evaluation]
"""

import dataclasses
import json
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from tensorboard.plugins.hparams import api as hp

from trainer import export
from trainer import figures
from trainer.data import pipeline

# The split whose pictures go to TensorBoard: the first of these evaluated.
PICTURE_SPLITS = ("test", "validation")
NUM_SAMPLES = 16
# Config fields that say where a run wrote or how it ran, not what it
# learned; left out so the HParams table (which shows its first five
# columns) opens on settings that change results.
_NOT_HPARAMS = ("job_dir", "model_dir", "checkpoint_dir", "log_dir", "cache",
                "checkpoint_every_steps", "tpu", "demo", "export_tflite", "hypertune_metric")


def predict_split(model_dir: str, split: pipeline.Split, image_size: int,
                  batch_size: int = 64):
    """Probabilities [n, classes] and labels [n] of a split, by the served model."""
    serve = tf.saved_model.load(export.resolve_model_dir(model_dir)).signatures["serving_images"]
    dataset = pipeline.make_dataset(split, image_size, batch_size, training=False, cache="none")
    probabilities, labels = [], []
    for images, batch_labels in dataset:
        probabilities.append(
            serve(images=tf.cast(images, tf.float32))["probabilities"].numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> Dict:
    """Accuracy, balanced accuracy, macro F1, loss, per-class scores, confusion matrix
    (rows: true) and binary ROC AUC."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=-1)
    true_probability = probabilities[np.arange(len(labels)), labels]
    confusion = np.zeros((len(class_names), len(class_names)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = per_class_metrics(confusion, class_names)
    present = [c for c in per_class.values() if c["support"]]
    metrics = {
        "count": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        # Mean recall over the classes present (scikit-learn's balanced_accuracy_score):
        # what plain accuracy hides when one class dominates.
        "balanced_accuracy": float(np.mean([c["recall"] for c in present])) if present else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "loss": float(-np.log(np.clip(true_probability, 1e-7, 1.0)).mean()),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro_avg": {key: float(np.mean([c[key] for c in per_class.values()]))
                      for key in ("precision", "recall", "f1")},
    }
    if len(class_names) == 2:
        metrics["roc_auc"] = roc_auc(probabilities[:, 1], labels == 1)
    return metrics


def per_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> Dict[str, Dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix.

    A score whose denominator is 0 (a class never predicted, or absent) is
    0.0, as scikit-learn reports it by default.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    precision = _safe_divide(hits, confusion.sum(axis=0))
    recall = _safe_divide(hits, confusion.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {
        name: {"precision": float(precision[k]), "recall": float(recall[k]),
               "f1": float(f1[k]), "support": int(confusion[k].sum())}
        for k, name in enumerate(class_names)}


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64),
                     where=denominator > 0)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the ROC curve, or None when only one class is present.

    Computed as the Mann-Whitney statistic: the chance that a random positive
    scores above a random negative, ties counting one half (average ranks).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties averaged.
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_splits(model_dir: str, info: pipeline.DatasetInfo, image_size: int,
                    splits: Sequence[str] = ("validation", "test")) -> Dict:
    """Metrics for each named split present in ``info``."""
    results = {"class_names": list(info.class_names)}
    for name in splits:
        if name in info.splits and info.splits[name].count:
            probabilities, labels = predict_split(model_dir, info.splits[name], image_size)
            results[name] = classification_metrics(probabilities, labels, info.class_names)
    return results


def hparams_of(config) -> Dict:
    """A run's settings for TensorBoard's hparams view: its Config less _NOT_HPARAMS."""
    return {key: value for key, value in dataclasses.asdict(config).items()
            if key not in _NOT_HPARAMS and isinstance(value, (bool, int, float, str))}


def write_summaries(results: Mapping, model_dir: str, info: pipeline.DatasetInfo,
                    image_size: int, log_dir: str, hparams: Mapping, step: int = 0,
                    num_samples: int = NUM_SAMPLES) -> None:
    """Writes evaluation results to TensorBoard under ``log_dir`` (one run).

    Scalars ``<split>/<metric>`` for every evaluated split; for the first of
    PICTURE_SPLITS evaluated, a confusion-matrix image and a grid of
    ``num_samples`` of its images (spread over the classes) with true and
    predicted labels; and an hparams entry whose metrics are those scalars.

    Args:
      results: the output of evaluate_splits.
      model_dir: the exported model, to predict the sample images.
      info: the data the results came from.
      image_size: the model's input size, pixels.
      log_dir: the run folder to write, local or gs://.
      hparams: setting name -> bool, int, float or str.
      step: the step to record (the number of epochs trained).
      num_samples: images in the prediction grid.
    """
    class_names = list(info.class_names)
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for split in ("validation", "test"):
            for name, value in _scalars(results.get(split, {})).items():
                tf.summary.scalar(f"{split}/{name}", value)
        picture_split = next((s for s in PICTURE_SPLITS if s in results), None)
        if picture_split:
            tf.summary.image(f"confusion_matrix/{picture_split}", figures.confusion_matrix_image(
                results[picture_split]["confusion_matrix"], class_names)[np.newaxis])
            images, labels, probabilities = sample_predictions(
                model_dir, info.splits[picture_split], image_size, num_samples,
                len(class_names))
            tf.summary.image(f"predictions/{picture_split}", figures.prediction_grid(
                images, labels, probabilities, class_names)[np.newaxis])
        hp.hparams(dict(hparams))
    writer.close()


def _scalars(split_metrics: Mapping) -> Dict[str, float]:
    values = {key: split_metrics[key] for key in
              ("accuracy", "balanced_accuracy", "macro_f1", "loss") if key in split_metrics}
    if split_metrics.get("roc_auc") is not None:
        values["roc_auc"] = split_metrics["roc_auc"]
    return values


def sample_predictions(model_dir: str, split: pipeline.Split, image_size: int, count: int,
                       num_classes: int):
    """Up to ``count`` images of a split, spread over its classes, with predictions.

    Splits are often ordered by class, so the first images would all show one
    class; this takes up to an equal share of each class, in split order,
    reading no further than needed.

    Returns:
      images [n, size, size, 3], labels [n], probabilities [n, classes].
    """
    share = -(-count // num_classes)
    taken = np.zeros(num_classes, dtype=int)
    images, labels = [], []
    dataset = pipeline.make_dataset(split, image_size, 64, training=False, cache="none")
    for batch_images, batch_labels in dataset:
        for image, label in zip(batch_images.numpy(), batch_labels.numpy()):
            if taken[label] < share and len(labels) < count:
                taken[label] += 1
                images.append(image)
                labels.append(label)
        if len(labels) == count:
            break
    images = np.stack(images)
    serve = tf.saved_model.load(export.resolve_model_dir(model_dir)).signatures["serving_images"]
    probabilities = serve(images=tf.constant(images, tf.float32))["probabilities"].numpy()
    return images, np.asarray(labels), probabilities


def write_metrics(metrics: Dict, path: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)


# ------------------------------------------------------------ Command line


def evaluate_model(model_dir: str, data_dir: str, splits: Sequence[str] = ("test",),
                   log_dir: str = "", test_fraction: float = 0.2, seed: int = 42,
                   split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Dict:
    """Evaluates an exported model on named splits of a data folder.

    Args:
      model_dir: exported model folder, local or gs://.
      data_dir: data in any format training reads (image folders or records).
      splits: split names to evaluate; each must exist and hold images.
      log_dir: when set, TensorBoard summaries are written there.
      test_fraction: without a test/ folder, the held-out share of validation
        (must match the training run's to get the same test split).
      seed: the hold-out seed (likewise).
      split_fractions: how unassigned images were split (likewise).

    Returns:
      The metrics dict (as evaluate_splits).

    Raises:
      ValueError: the model's classes differ from the data's, or a split is
        missing.
    """
    model_dir = export.resolve_model_dir(model_dir)
    info = pipeline.describe(data_dir, test_fraction, seed, split_fractions)
    model_classes = export.read_class_names(model_dir)
    if list(info.class_names) != model_classes:
        raise ValueError(f"The model's classes {model_classes} differ from the classes of "
                         f"{data_dir}: {list(info.class_names)}.")
    missing = [s for s in splits if s not in info.splits or not info.splits[s].count]
    if missing:
        raise ValueError(f"{data_dir} has no images in split(s) {missing}; it has "
                         f"{sorted(s for s in info.splits if info.splits[s].count)}.")
    image_size = export.read_image_size(model_dir)
    results = evaluate_splits(model_dir, info, image_size, splits)
    if log_dir:
        write_summaries(results, model_dir, info, image_size, log_dir,
                        {"model": model_dir, "data_dir": data_dir})
    return results


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the evaluation command's flags (not at import: train.py imports this module)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Exported model folder, local or gs://.", **fv)
    flags.DEFINE_string(
        "data_dir", None,
        "Data, local or gs://, in any form training reads: image folders, "
        "Vertex AI import files (.csv, .jsonl) or trainer.prepare records.", **fv)
    flags.DEFINE_list("splits", ["test"], "Comma-separated splits to evaluate.", **fv)
    flags.DEFINE_string(
        "output", "", "Write the metrics JSON to this file (local or gs://); "
        "empty prints it to stdout.", **fv)
    flags.DEFINE_string(
        "log_dir", "",
        "Also write TensorBoard summaries (scalars, confusion matrix, sample "
        "predictions, hparams) to this folder; empty writes none.", **fv)
    flags.DEFINE_float(
        "test_fraction", 0.2,
        "Without a test/ folder, the fraction of validation held out as test; "
        "use the training run's value to get the same images.", **fv)
    flags.DEFINE_integer("seed", 42, "Seed of that hold-out; use the training run's.", **fv)
    flags.DEFINE_list(
        "split_fractions", ["0.8", "0.1", "0.1"],
        "train,validation,test shares of images without a split (class folders "
        "only, unassigned import rows); use the training run's.", **fv)
    flags.mark_flags_as_required(["model", "data_dir"], flag_values=flag_values)


def run(flag_values: flags.FlagValues = flags.FLAGS) -> Dict:
    """Evaluates as the parsed flags say; writes or prints the JSON; returns the metrics."""
    try:
        results = evaluate_model(flag_values.model, flag_values.data_dir, flag_values.splits,
                                 flag_values.log_dir, flag_values.test_fraction,
                                 flag_values.seed,
                                 tuple(float(f) for f in flag_values.split_fractions))
    except ValueError as e:  # Includes pipeline.DataError.
        raise app.UsageError(str(e)) from None
    if flag_values.output:
        write_metrics(results, flag_values.output)
        print(f"Metrics: {flag_values.output}")
    else:
        print(json.dumps(results, indent=2, sort_keys=True))
    return results


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run()


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
