"""Metrics of an exported model on a split: JSON, TensorBoard pictures, hparams; a CLI.

The final numbers of a run come from the exported SavedModel itself, read
back with plain TensorFlow: they describe exactly what will be served, and
they need no collective ops, so only the chief computes them.

For each split, everything :mod:`trainer.metrics` computes: accuracy,
balanced accuracy, macro F1, log loss, expected calibration error, per-class
precision, recall and F1, the confusion matrix, average precision (area
under the PR curve), AutoML's table of precision and recall at confidence
thresholds 0.00-0.99, top-5 accuracy past five classes, binary ROC AUC; and
the worst mistakes (most confident wrong predictions, with their files). The
TensorBoard summaries (one run, e.g. ``logs/evaluation``) hold the numbers as
scalars, a PR curve per class (the PR-curve plugin), a confusion-matrix
image, a grid of sample predictions, a grid of the worst mistakes and an
hparams entry, so the run shows up in TensorBoard's HParams dashboard with
its results. The worst-mistakes grid is also written as a PNG when asked.
A multi-label model (one with thresholds) is evaluated by
trainer/multilabel_eval.py: micro/macro F1, mean average precision, exact
match, Hamming loss and per-class scores at its thresholds, PR curves.

Command line, over any exported model and data folder::

    python -m trainer.evaluate --model=job/model --data_dir=data \
        [--splits=test] [--output=eval.json] [--log_dir=job/logs/evaluation] \
        [--mistakes_png=job/worst_mistakes.png]
"""

import dataclasses
import json
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import summary as pr_curve_summary

from trainer import export
from trainer import figures
from trainer import metrics as metrics_lib
from trainer import multilabel_eval
from trainer import thresholds as thresholds_lib
from trainer.data import pipeline

# The split whose pictures go to TensorBoard: the first of these evaluated.
PICTURE_SPLITS = ("test", "validation")
NUM_SAMPLES = 16
NUM_MISTAKES = 16  # Worst mistakes listed in the JSON and drawn in the grid.
MISTAKES_FILE = "worst_mistakes.png"
# TensorBoard PR curves: thresholds 0, 1/100, ..., 1, AutoML's grid and its end.
PR_CURVE_THRESHOLDS = 101
# Config fields that say where a run wrote or how it ran, not what it
# learned; left out so the HParams table (which shows its first five
# columns) opens on settings that change results.
_NOT_HPARAMS = ("job_dir", "model_dir", "checkpoint_dir", "log_dir", "cache",
                "checkpoint_every_steps", "tpu", "demo", "export_tflite", "export_onnx",
                "hypertune_metric")


def predict_split(model_dir: str, split: pipeline.Split, image_size: int,
                  batch_size: int = 64):
    """Probabilities [n, classes] and labels [n] (k-hot [n, classes] for a multi-label
    split) of a split, by the served model."""
    serve = tf.saved_model.load(export.resolve_model_dir(model_dir)).signatures["serving_images"]
    dataset = pipeline.make_dataset(split, image_size, batch_size, training=False, cache="none")
    probabilities, labels = [], []
    for images, batch_labels in dataset:
        probabilities.append(
            serve(images=tf.cast(images, tf.float32))["probabilities"].numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def predict_splits(model_dir: str, info: pipeline.DatasetInfo, image_size: int,
                   splits: Sequence[str] = ("validation", "test")) -> Dict[str, Tuple]:
    """Split name -> (probabilities, labels) for each named split present in ``info``."""
    return {name: predict_split(model_dir, info.splits[name], image_size)
            for name in splits if name in info.splits and info.splits[name].count}


def split_metrics(predictions: Mapping[str, Tuple], info: pipeline.DatasetInfo,
                  thresholds: Optional[Mapping[str, float]] = None) -> Dict:
    """The metrics JSON of predict_splits' output: class names, then a dict per split.

    ``thresholds``: a multi-label model's ({class: threshold}, thresholds_lib.read).
    """
    if info.multi_label:
        return multilabel_eval.split_metrics(predictions, info.class_names, thresholds)
    results = {"class_names": list(info.class_names)}
    for name, (probabilities, labels) in predictions.items():
        results[name] = metrics_lib.classification_metrics(
            probabilities, labels, info.class_names)
        results[name]["worst_mistakes"] = _mistakes(probabilities, labels, info.splits[name],
                                                    info.class_names)
    return results


def evaluate_splits(model_dir: str, info: pipeline.DatasetInfo, image_size: int,
                    splits: Sequence[str] = ("validation", "test")) -> Dict:
    """Metrics for each named split present in ``info``."""
    return split_metrics(predict_splits(model_dir, info, image_size, splits), info)


def _mistakes(probabilities, labels, split: pipeline.Split,
              class_names: Sequence[str]) -> list:
    """The split's NUM_MISTAKES most confident wrong predictions, as JSON rows."""
    rows = []
    for index in metrics_lib.worst_mistakes(probabilities, labels, NUM_MISTAKES):
        predicted = int(probabilities[index].argmax())
        row = {"index": index, "true": class_names[int(labels[index])],
               "predicted": class_names[predicted],
               "score": float(probabilities[index, predicted])}
        if split.paths:
            row["path"] = split.paths[index]
        rows.append(row)
    return rows


def hparams_of(config) -> Dict:
    """A run's settings for TensorBoard's hparams view: its Config less _NOT_HPARAMS."""
    return {key: value for key, value in dataclasses.asdict(config).items()
            if key not in _NOT_HPARAMS and isinstance(value, (bool, int, float, str))}


def write_summaries(results: Mapping, model_dir: str, info: pipeline.DatasetInfo,
                    image_size: int, log_dir: str, hparams: Mapping, step: int = 0,
                    num_samples: int = NUM_SAMPLES,
                    predictions: Optional[Mapping[str, Tuple]] = None,
                    mistakes_png: str = "") -> None:
    """Writes evaluation results to TensorBoard under ``log_dir`` (one run).

    Scalars ``<split>/<metric>`` for every evaluated split; PR curves
    ``pr_curve/<split>/<class>`` (TensorBoard's PR-curve plugin, one class
    against the rest); for the first of PICTURE_SPLITS evaluated, a
    confusion-matrix image, a grid of ``num_samples`` of its images (spread
    over the classes) with true and predicted labels, and a grid of its worst
    mistakes (also written to ``mistakes_png`` when set); and an hparams entry
    whose metrics are those scalars.

    Args:
      results: the output of evaluate_splits (or split_metrics).
      model_dir: the exported model, to predict the pictured images.
      info: the data the results came from.
      image_size: the model's input size, pixels.
      log_dir: the run folder to write, local or gs://.
      hparams: setting name -> bool, int, float or str.
      step: the step to record (the number of epochs trained).
      num_samples: images in the prediction grid.
      predictions: predict_splits' output the results came from; None
        predicts the evaluated splits again.
      mistakes_png: where to write the worst-mistakes grid as PNG; "" writes none.
    """
    class_names = list(info.class_names)
    evaluated = [s for s in ("validation", "test") if s in results]
    if predictions is None:
        predictions = predict_splits(model_dir, info, image_size, evaluated)
    if info.multi_label:
        multilabel_eval.write_summaries(results, predictions, log_dir, hparams, step,
                                        write_pr_curves)
        return
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for split in evaluated:
            for name, value in _scalars(results[split]).items():
                tf.summary.scalar(f"{split}/{name}", value)
            write_pr_curves(f"pr_curve/{split}", *predictions[split], class_names)
        picture_split = next((s for s in PICTURE_SPLITS if s in results), None)
        if picture_split:
            tf.summary.image(f"confusion_matrix/{picture_split}", figures.confusion_matrix_image(
                results[picture_split]["confusion_matrix"], class_names)[np.newaxis])
            images, labels, probabilities = sample_predictions(
                model_dir, info.splits[picture_split], image_size, num_samples,
                len(class_names))
            tf.summary.image(f"predictions/{picture_split}", figures.prediction_grid(
                images, labels, probabilities, class_names)[np.newaxis])
            _write_mistakes(results[picture_split]["worst_mistakes"], picture_split, model_dir,
                            info, image_size, mistakes_png)
        hp.hparams(dict(hparams))
    writer.close()


def write_pr_curves(tag: str, probabilities: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str]) -> None:
    """One PR curve per class (its probability, the class against the rest) as
    ``<tag>/<class>``, into the default summary writer. ``labels``: class indices
    [n], or a boolean matrix [n, classes] of each class's presence (multi-label).

    The plugin's own ``pb`` computes the curve's counts; the tensor and its
    metadata are written through the TF2 summary API, which takes them as is.
    """
    labels = np.asarray(labels)
    truth = labels if labels.ndim == 2 else metrics_lib.one_hot(labels, len(class_names))
    for k, name in enumerate(class_names):
        value = pr_curve_summary.pb(
            f"{tag}/{name}", truth[:, k], np.asarray(probabilities[:, k], np.float32),
            num_thresholds=PR_CURVE_THRESHOLDS).value[0]
        tf.summary.write(f"{tag}/{name}", tf.make_ndarray(value.tensor),
                         metadata=value.metadata.SerializeToString())


def _write_mistakes(mistakes: Sequence[Mapping], split_name: str, model_dir: str,
                    info: pipeline.DatasetInfo, image_size: int, png_path: str) -> None:
    """The worst-mistakes grid: to TensorBoard as ``worst_mistakes/<split>``, and as a PNG."""
    if not mistakes:
        logging.info("No mistakes on %s: no worst-mistakes grid.", split_name)
        return
    indices = [m["index"] for m in mistakes]
    images, labels = images_at(info.splits[split_name], image_size, indices)
    serve = tf.saved_model.load(model_dir).signatures["serving_images"]
    probabilities = serve(images=tf.constant(images, tf.float32))["probabilities"].numpy()
    grid = figures.prediction_grid(images, labels, probabilities, list(info.class_names))
    tf.summary.image(f"worst_mistakes/{split_name}", grid[np.newaxis])
    if png_path:
        figures.save_png(grid, png_path)


def images_at(split: pipeline.Split, image_size: int, indices: Sequence[int]):
    """The split's images and labels at ``indices`` (split order), in the order given,
    reading no further than the last one."""
    wanted = {index: None for index in indices}
    last, position = max(indices), 0
    dataset = pipeline.make_dataset(split, image_size, 64, training=False, cache="none")
    for batch_images, batch_labels in dataset:
        for image, label in zip(batch_images.numpy(), batch_labels.numpy()):
            if position in wanted:
                wanted[position] = (image, label)
            position += 1
        if position > last:
            break
    return (np.stack([wanted[i][0] for i in indices]),
            np.asarray([wanted[i][1] for i in indices]))


def _scalars(split: Mapping) -> Dict[str, float]:
    values = {key: split[key] for key in
              ("accuracy", "balanced_accuracy", "macro_f1", "loss", "log_loss",
               "expected_calibration_error", f"top_{metrics_lib.TOP_K}_accuracy")
              if key in split}
    for key in ("micro", "macro"):
        if split.get("average_precision", {}).get(key) is not None:
            values[f"average_precision_{key}"] = split["average_precision"][key]
    if split.get("roc_auc") is not None:
        values["roc_auc"] = split["roc_auc"]
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
                   split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   mistakes_png: str = "") -> Dict:
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
      mistakes_png: with ``log_dir``, also write the worst-mistakes grid there.

    Returns:
      The metrics dict (as evaluate_splits).

    Raises:
      ValueError: the model's classes differ from the data's, or a split is
        missing.
    """
    model_dir = export.resolve_model_dir(model_dir)
    thresholds = thresholds_lib.read(model_dir)  # A multi-label model's; None otherwise.
    info = pipeline.describe(data_dir, test_fraction, seed, split_fractions).with_task(
        thresholds is not None)
    model_classes = export.read_class_names(model_dir)
    if list(info.class_names) != model_classes:
        raise ValueError(f"The model's classes {model_classes} differ from the classes of "
                         f"{data_dir}: {list(info.class_names)}.")
    missing = [s for s in splits if s not in info.splits or not info.splits[s].count]
    if missing:
        raise ValueError(f"{data_dir} has no images in split(s) {missing}; it has "
                         f"{sorted(s for s in info.splits if info.splits[s].count)}.")
    image_size = export.read_image_size(model_dir)
    predictions = predict_splits(model_dir, info, image_size, splits)
    results = split_metrics(predictions, info, thresholds)
    if log_dir:
        write_summaries(results, model_dir, info, image_size, log_dir,
                        {"model": model_dir, "data_dir": data_dir},
                        predictions=predictions, mistakes_png=mistakes_png)
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
        "Also write TensorBoard summaries (scalars, PR curves, confusion matrix, "
        "sample predictions, worst mistakes, hparams) to this folder; empty writes none.",
        **fv)
    flags.DEFINE_string(
        "mistakes_png", "",
        "With --log_dir, also write the grid of the worst mistakes (most confident "
        "wrong predictions of the test split, else validation) to this PNG file.", **fv)
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
                                 tuple(float(f) for f in flag_values.split_fractions),
                                 flag_values.mistakes_png)
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
