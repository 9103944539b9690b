"""Classification metrics from predicted probabilities and true labels (numpy only).

Everything ``evaluate`` reports about a split is computed here, from
``probabilities`` [n, classes] (rows sum to 1) and integer ``labels`` [n]:

* accuracy, balanced accuracy, macro F1, per-class precision/recall/F1, the
  confusion matrix (rows: true), binary ROC AUC;
* log loss (mean cross-entropy of the true class);
* expected calibration error of the top label;
* top-5 accuracy when there are more than five classes;
* area under the precision-recall curve (average precision), per class,
  micro- and macro-averaged;
* AutoML's confidence-threshold table: precision, recall and F1 at every
  threshold 0.00, 0.01, ..., 0.99, per class and micro-averaged;
* the worst mistakes: wrong predictions, most confident first.

A score whose denominator is 0 (nothing predicted, or a class absent) is
0.0, as scikit-learn reports it by default and TensorBoard's PR-curve plugin
draws it.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

# AutoML's table: a prediction counts at threshold t when its probability is >= t.
THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(100))
CALIBRATION_BINS = 15  # Equal-width confidence bins, as Guo et al. (2017) report ECE.
TOP_K = 5  # Reported when there are more classes than this.
_LOG_EPSILON = 1e-7  # Probabilities are float32; clip before the log.


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str]) -> Dict:
    """Every metric of a split, JSON-ready (see the module docstring)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=-1)
    confusion = np.zeros((len(class_names), len(class_names)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = per_class_metrics(confusion, class_names)
    present = [c for c in per_class.values() if c["support"]]
    loss = log_loss(probabilities, labels)
    metrics = {
        "count": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        # Mean recall over the classes present (scikit-learn's balanced_accuracy_score):
        # what plain accuracy hides when one class dominates.
        "balanced_accuracy": float(np.mean([c["recall"] for c in present])) if present else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "loss": loss,
        "log_loss": loss,
        "expected_calibration_error": expected_calibration_error(probabilities, labels),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro_avg": {key: float(np.mean([c[key] for c in per_class.values()]))
                      for key in ("precision", "recall", "f1")},
        "average_precision": average_precisions(probabilities, labels, class_names),
        "confidence_thresholds": threshold_table(probabilities, labels, class_names),
    }
    if len(class_names) == 2:
        metrics["roc_auc"] = roc_auc(probabilities[:, 1], labels == 1)
    if len(class_names) > TOP_K:
        metrics[f"top_{TOP_K}_accuracy"] = top_k_accuracy(probabilities, labels, TOP_K)
    return metrics


def per_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> Dict[str, Dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    precision = safe_divide(hits, confusion.sum(axis=0))
    recall = safe_divide(hits, confusion.sum(axis=1))
    f1 = safe_divide(2 * precision * recall, precision + recall)
    return {
        name: {"precision": float(precision[k]), "recall": float(recall[k]),
               "f1": float(f1[k]), "support": int(confusion[k].sum())}
        for k, name in enumerate(class_names)}


def safe_divide(numerator, denominator) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(
        numerator, denominator).shape), where=denominator > 0)


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


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean of -ln(probability of the true class), probabilities clipped at 1e-7."""
    true_probability = np.asarray(probabilities)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(true_probability, _LOG_EPSILON, 1.0)).mean())


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the top label.

    Images are put in ``bins`` equal-width bins of their top probability
    (bin b holds confidences in (b/bins, (b+1)/bins]); ECE is the mean over
    images of |accuracy - mean confidence| of their bin.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    # Per bin: |sum(correct) - sum(confidence)| = count * |accuracy - confidence|.
    return float(gap.sum() / max(count.sum(), 1))


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the ``k`` most probable.

    A true class tied at the boundary counts as in (fewer than ``k`` classes
    score strictly higher), as ``tf.math.in_top_k`` rules.
    """
    probabilities = np.asarray(probabilities)
    true_probability = probabilities[np.arange(len(labels)), labels]
    higher = (probabilities > true_probability[:, np.newaxis]).sum(axis=1)
    return float((higher < k).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the precision-recall curve as average precision; None without positives.

    AP = sum over score thresholds, highest first, of (R_n - R_{n-1}) * P_n,
    the step-wise area scikit-learn's ``average_precision_score`` computes
    (no interpolation); tied scores form one threshold.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    true_positives = np.cumsum(positive)
    # The last index of each run of tied scores: one threshold per distinct score.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    precision = true_positives[last] / (last + 1)
    recall = true_positives[last] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precisions(probabilities: np.ndarray, labels: np.ndarray,
                       class_names: Sequence[str]) -> Dict:
    """Average precision per class (one against the rest), micro (every image-class
    pair pooled) and macro (mean over the classes present)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = one_hot(labels, len(class_names))
    per_class = {name: average_precision(probabilities[:, k], truth[:, k])
                 for k, name in enumerate(class_names)}
    defined = [v for v in per_class.values() if v is not None]
    return {"micro": average_precision(probabilities, truth),
            "macro": float(np.mean(defined)) if defined else None,
            "per_class": per_class}


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=bool)[np.asarray(labels, dtype=np.int64)]


def precision_recall_at(scores: np.ndarray, positive: np.ndarray,
                        thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, List[float]]:
    """Precision, recall and F1 of "predicted when score >= t", for each threshold t."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    predicted = scores[np.newaxis, :] >= np.asarray(thresholds)[:, np.newaxis]
    true_positives = (predicted & positive).sum(axis=1)
    precision = safe_divide(true_positives, predicted.sum(axis=1))
    recall = safe_divide(true_positives, positive.sum())
    f1 = safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist()}


def threshold_table(probabilities: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str],
                    thresholds: Sequence[float] = THRESHOLDS) -> Dict:
    """AutoML's confidence-threshold table, as columns.

    Per class: an image is predicted as the class when its probability for
    it is >= t. Micro-averaged: every (image, class) pair with probability
    >= t is a prediction, right when the class is the image's; its recall is
    right predictions over images, its precision right over all predictions.

    Returns:
      {"threshold": [t...], "micro": {"precision": [...], "recall": [...],
      "f1": [...]}, "per_class": {name: the same}}.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = one_hot(labels, len(class_names))
    return {"threshold": list(thresholds),
            "micro": precision_recall_at(probabilities, truth, thresholds),
            "per_class": {name: precision_recall_at(probabilities[:, k], truth[:, k], thresholds)
                          for k, name in enumerate(class_names)}}


def worst_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int) -> List[int]:
    """Indices of up to ``count`` wrong predictions, highest top probability first."""
    probabilities = np.asarray(probabilities)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != np.asarray(labels))
    order = np.argsort(-probabilities[wrong].max(axis=1), kind="stable")
    return wrong[order][:count].tolist()
