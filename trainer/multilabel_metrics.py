"""Multi-label metrics and decision thresholds from per-class scores (numpy only).

Inputs: ``scores`` [n, classes], each class's own sigmoid probability, and
``truth`` [n, classes], the k-hot labels. A class is predicted for an image
when its score is >= the class's threshold.

* ``choose_thresholds``: per class, the threshold of highest F1 on the
  validation split (``--multi_label_threshold`` unset), or one global
  threshold for every class. A chosen threshold sits halfway between the
  lowest score it admits and the next lower score, so a test image scoring
  between the two is not decided by float noise; a class with no positive
  validation image keeps 0.5.
* ``multilabel_metrics``: micro F1 (every image-class pair pooled), macro F1
  (mean over the classes), mean average precision (mean over the classes
  with positives of the PR-curve area, trainer/metrics.py's
  ``average_precision``), exact-match ratio (images whose predicted label set
  equals the true one), Hamming loss (share of wrong image-class pairs), mean
  binary cross-entropy, and per class precision, recall, F1, average
  precision, support and threshold.
"""

from typing import Dict, Optional, Sequence

import numpy as np

from trainer import metrics as metrics_lib

DEFAULT_THRESHOLD = 0.5
_LOG_EPSILON = 1e-7


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold of highest F1 for one class (ties: the highest such threshold)."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    if not positive.any():
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    true_positives = np.cumsum(positive)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # One per distinct score.
    precision = true_positives[last] / (last + 1)
    recall = true_positives[last] / positive.sum()
    f1 = metrics_lib.safe_divide(2 * precision * recall, precision + recall)
    best = int(np.argmax(f1))
    lowest_admitted = scores[last[best]]
    below = scores[last[best] + 1] if last[best] + 1 < len(scores) else 0.0
    return float((lowest_admitted + below) / 2.0)


def choose_thresholds(scores: np.ndarray, truth: np.ndarray,
                      global_threshold: Optional[float] = None) -> np.ndarray:
    """float32 [classes]: ``global_threshold`` for every class, or each class's best-F1
    threshold on these scores."""
    scores, truth = np.asarray(scores), np.asarray(truth) > 0.5
    if global_threshold is not None:
        return np.full(scores.shape[1], global_threshold, np.float32)
    return np.asarray([best_f1_threshold(scores[:, k], truth[:, k])
                       for k in range(scores.shape[1])], np.float32)


def _f1(true_positives, predicted, actual):
    return metrics_lib.safe_divide(2 * np.asarray(true_positives, np.float64),
                                   np.asarray(predicted) + np.asarray(actual))


def multilabel_metrics(scores: np.ndarray, truth: np.ndarray, thresholds: Sequence[float],
                       class_names: Sequence[str]) -> Dict:
    """Every multi-label metric of a split, JSON-ready (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    truth = np.asarray(truth) > 0.5
    predicted = scores >= np.asarray(thresholds, np.float64)[np.newaxis]
    hits = (predicted & truth).sum(axis=0)
    precision = metrics_lib.safe_divide(hits, predicted.sum(axis=0))
    recall = metrics_lib.safe_divide(hits, truth.sum(axis=0))
    f1 = _f1(hits, predicted.sum(axis=0), truth.sum(axis=0))
    ap = [metrics_lib.average_precision(scores[:, k], truth[:, k])
          for k in range(len(class_names))]
    defined = [v for v in ap if v is not None]
    clipped = np.clip(scores, _LOG_EPSILON, 1 - _LOG_EPSILON)
    loss = -(truth * np.log(clipped) + (~truth) * np.log(1 - clipped)).mean()
    return {
        "count": int(len(scores)),
        "micro_f1": float(_f1(hits.sum(), predicted.sum(), truth.sum())),
        "macro_f1": float(f1.mean()),
        "mean_average_precision": float(np.mean(defined)) if defined else 0.0,
        "exact_match": float((predicted == truth).all(axis=1).mean()),
        "hamming_loss": float((predicted != truth).mean()),
        "loss": float(loss),
        "label_cardinality": {"true": float(truth.sum(axis=1).mean()),
                              "predicted": float(predicted.sum(axis=1).mean())},
        "per_class": {
            name: {"precision": float(precision[k]), "recall": float(recall[k]),
                   "f1": float(f1[k]), "average_precision": ap[k],
                   "support": int(truth[:, k].sum()), "threshold": float(thresholds[k])}
            for k, name in enumerate(class_names)},
    }


def frequency_baseline_micro_f1(train_truth: np.ndarray, truth: np.ndarray) -> float:
    """Expected micro F1 of predicting each class at random with its train frequency.

    A predictor that knows only the label frequencies ``p_k`` and predicts
    class k with probability ``p_k``: expected true positives ``sum p_k n_k``,
    predictions ``n * sum p_k``, actual labels ``sum n_k``. What a model must
    clearly beat to have learned from the images.
    """
    frequencies = (np.asarray(train_truth) > 0.5).mean(axis=0)
    truth = np.asarray(truth) > 0.5
    positives = truth.sum(axis=0)
    return float(_f1((frequencies * positives).sum(), len(truth) * frequencies.sum(),
                     positives.sum()))
