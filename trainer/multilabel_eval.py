"""Evaluation of a multi-label export: its metrics JSON and its TensorBoard summaries.

trainer/evaluate.py hands a multi-label model's predictions here: the
served model's per-class scores and the k-hot truth of each split, and the
thresholds saved with the model (trainer/thresholds.py). The JSON has, per
split, trainer/multilabel_metrics.py's metrics at those thresholds, and at
the top ``task`` ("multi_label") and ``thresholds`` ({class: threshold}).
TensorBoard gets the split scalars, a PR curve per class (the class's score
against its presence) and the hparams entry; the single-label pictures
(confusion matrix, prediction grids) are left out.
"""

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer import multilabel_metrics

TASK = "multi_label"
SCALARS = ("micro_f1", "macro_f1", "mean_average_precision", "exact_match", "hamming_loss",
           "loss")


def split_metrics(predictions: Mapping[str, Tuple], class_names: Sequence[str],
                  thresholds: Mapping[str, float]) -> Dict:
    """The metrics JSON of (scores, k-hot truth) per split, at the model's thresholds."""
    ordered = [float(thresholds[name]) for name in class_names]
    results = {"class_names": list(class_names), "task": TASK,
               "thresholds": {name: t for name, t in zip(class_names, ordered)}}
    for name, (scores, truth) in predictions.items():
        results[name] = multilabel_metrics.multilabel_metrics(scores, truth, ordered,
                                                              class_names)
    return results


def write_summaries(results: Mapping, predictions: Mapping[str, Tuple], log_dir: str,
                    hparams: Mapping, step: int, write_pr_curves) -> None:
    """Scalars ``<split>/<metric>``, PR curves ``pr_curve/<split>/<class>`` and hparams.

    ``write_pr_curves``: evaluate's writer of one PR curve per class, given
    (tag, scores, truth, class names).
    """
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        for split in [s for s in ("validation", "test") if s in results]:
            for name in SCALARS:
                tf.summary.scalar(f"{split}/{name}", results[split][name])
            scores, truth = predictions[split]
            write_pr_curves(f"pr_curve/{split}", scores, np.asarray(truth) > 0.5,
                            results["class_names"])
        hp.hparams(dict(hparams))
    writer.close()
