"""Per-class example weights for imbalanced data (``--class_weighting``), and the warning.

``balanced`` weighs each training example ``n / (k * n_class)`` (``n`` train
images, ``k`` classes, ``n_class`` images of its class): every class then
carries the same total weight, scikit-learn's ``class_weight="balanced"``.
The pipeline applies the weights as sample weights (see
``pipeline.with_sample_weights``).
"""

from typing import Optional, Sequence, Tuple

import numpy as np
from absl import logging

MODES = ("none", "balanced")
WARN_RATIO = 3.0  # Largest over smallest train class above this: say so.


def class_weights(labels: Sequence[int], class_names: Sequence[str],
                  mode: str) -> Optional[Tuple[float, ...]]:
    """A weight per class from the train labels, or None for ``mode='none'``.

    Logs a warning naming the counts and the flag when the train split is
    imbalanced over WARN_RATIO:1 and ``mode`` is 'none'.
    """
    if mode not in MODES:
        raise ValueError(f"class weighting {mode!r}: must be one of {MODES}.")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    ratio = counts.max() / max(counts.min(), 1)
    shown = ", ".join(f"{name}: {int(n)}" for name, n in zip(class_names, counts))
    if mode == "none":
        if ratio > WARN_RATIO:
            logging.warning(
                "Train classes are imbalanced %.1f:1 (%s). Accuracy can hide a model that "
                "never predicts the rare classes: watch balanced_accuracy and macro_f1, or "
                "pass --class_weighting=balanced.", ratio, shown)
        return None
    weights = tuple(float(len(labels) / (len(class_names) * max(int(n), 1))) for n in counts)
    logging.info("Class weights (balanced, from train counts %s): %s.", shown,
                 ", ".join(f"{w:.3g}" for w in weights))
    return weights
