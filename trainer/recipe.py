"""The recipe: how long each phase trains, at what rate, and the choices made on validation.

``--recipe`` picks one of two:

* ``tutorial``: exactly the epochs, learning rates and optimizers that the
  flags give; their defaults are the tutorial's (10 frozen epochs of Adam
  1e-4, then 10 fine-tuning epochs of RMSprop 1e-5). Kept for comparison.
* ``auto`` (the default): budgets in optimizer steps scaled to the data, so
  that a set of 100 images trains as long as one of 10,000 needs, not 10
  epochs of 4 steps. Each phase validates at a fixed interval of steps, stops
  after ``patience`` validations without a lower validation loss and ends on
  its best weights.

  - Phase 1, when it runs on cached features, *searches* the head's learning
    rate: one short run per candidate of ``HEAD_LEARNING_RATES``, the head
    reset before each, and keeps the run of lowest validation loss. A cached
    step runs only the head, so the search costs little next to phase 2
    (recipe_fit.md times whole jobs with it).
  - Phase 2 trains at ``FINE_TUNE_RATIO`` times phase 1's chosen rate: the
    ratio of the tutorial's fast schedule (head 1e-3, backbone 1e-5).
  - Without the feature cache, or on TPUs (where each short run would be
    compiled anew), phase 1 runs one fixed rate, ``FIXED_HEAD_LEARNING_RATE``,
    on the same step budget, and the log says so.

  - The input side: the backbone's native resolution (224 for every
    ImageNet backbone here) when the train images' median shorter side is at
    least that, else ``--image_size`` (160). Measured on cats vs dogs with
    MobileNetV2's 224-px weights: 99.0% test accuracy at 224 against 97.5%
    at 160, for 1.5x the time (benchmarks/results/recipe_fit_image_size.md).

  A recipe flag the user sets explicitly (``--learning_rate``, ``--epochs``,
  ``--fine_tune_epochs``, ``--fine_tune_learning_rate``,
  ``--early_stopping_patience``, ``--image_size``) pins that choice; the rest stay automatic.

Choices are made on the validation split; the test split is read only by the
final evaluation. ``train.py`` asks this module for its phases; this module
knows nothing of models or data beyond their counts.
"""

import dataclasses
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

AUTO = "auto"
TUTORIAL = "tutorial"
RECIPES = (AUTO, TUTORIAL)
# Config fields that ``auto`` chooses unless a flag pins them.
KNOBS = ("epochs", "fine_tune_epochs", "learning_rate", "fine_tune_learning_rate",
         "early_stopping_patience", "image_size")

HEAD_LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)  # Adam on pooled features.
FIXED_HEAD_LEARNING_RATE = 1e-3  # Phase 1 without a search.
FINE_TUNE_RATIO = 0.01  # Phase 2's rate / phase 1's.
# Step budgets: this many epochs, clamped to [lowest, highest] steps.
HEAD_BUDGET = (20, 1500, 10000)
FINE_TUNE_BUDGET = (10, 300, 30000)
VALIDATIONS = (10, 30)  # Validations per phase: at least, at most (a step interval apart).
PATIENCE = 5  # Validations without a lower validation loss before a phase stops.

FINISHED_FILE = "finished.json"  # In a phase's backup folder: the phase is done.


@dataclasses.dataclass(frozen=True)
class Phase:
    """One fit: its epochs [first_epoch, last_epoch) of ``steps_per_epoch`` steps.

    An "epoch" is the interval between validations: the pass over the train
    split in ``tutorial``, a step interval in ``auto``.

    Attributes:
      number: 1 (frozen backbone) or 2 (fine-tuning).
      first_epoch, last_epoch: epoch numbers, continued across phases.
      optimizer: name in train.py's optimizer table.
      learning_rate: the rate (phase 1 of a search: the first candidate).
      steps_per_epoch: optimizer steps between validations.
      patience: validations without a lower validation loss before the phase
        stops on its best weights; 0 never stops early.
      restore_best: end on the weights of the lowest validation loss, whether
        or not the phase stopped early (``auto``).
      learning_rates: candidates of a head search; empty when there is none.
    """

    number: int
    first_epoch: int
    last_epoch: int
    optimizer: str
    learning_rate: float
    steps_per_epoch: int
    patience: int = 0
    restore_best: bool = False
    learning_rates: Tuple[float, ...] = ()

    @property
    def steps(self) -> int:
        return (self.last_epoch - self.first_epoch) * self.steps_per_epoch

    def with_rate(self, learning_rate: float) -> "Phase":
        return dataclasses.replace(self, learning_rate=learning_rate, learning_rates=())


def _chosen(config, knob: str) -> bool:
    """Whether ``auto`` chooses this knob (the user did not pin it)."""
    return config.recipe == AUTO and knob not in config.recipe_pinned


def image_size(config, native_size: Optional[int], median_short_side: Optional[int]) -> int:
    """The input side: native when ``auto`` chooses it and the images are that large."""
    if (_chosen(config, "image_size") and native_size and median_short_side
            and median_short_side >= native_size):
        return native_size
    return config.image_size


def validation_interval(budget_steps: int, steps_per_epoch: int) -> int:
    """Steps between validations: an epoch, unless that gives too few or too many."""
    fewest, most = VALIDATIONS
    return int(min(max(steps_per_epoch, math.ceil(budget_steps / most)),
                   max(1, budget_steps // fewest)))


def _budget(epochs: int, lowest: int, highest: int, steps_per_epoch: int) -> int:
    return int(min(max(epochs * steps_per_epoch, lowest), highest))


def _auto_phase(config, number: int, epochs_knob: str, budget: Tuple[int, int, int],
                steps_per_epoch: int, first_epoch: int, optimizer: str,
                learning_rate: float) -> Optional[Phase]:
    patience = PATIENCE if _chosen(config, "early_stopping_patience") else (
        config.early_stopping_patience)
    if _chosen(config, epochs_knob):
        steps = _budget(*budget, steps_per_epoch)
        interval = validation_interval(steps, steps_per_epoch)
        epochs = math.ceil(steps / interval)
    else:
        interval, epochs = steps_per_epoch, getattr(config, epochs_knob)
    if not epochs:
        return None
    return Phase(number, first_epoch, first_epoch + epochs, optimizer, learning_rate,
                 interval, patience, restore_best=True)


def phase_one(config, steps_per_epoch: int, can_search: bool) -> Optional[Phase]:
    """Phase 1, or None when it has no steps.

    Args:
      config: the run's Config.
      steps_per_epoch: steps of one pass over the train split.
      can_search: phase 1 runs on cached features on a strategy where short
        runs are cheap, so ``auto`` may search the learning rate.
    """
    if config.recipe == TUTORIAL:
        return _tutorial_phase(config, 1, 0, config.epochs, config.optimizer,
                               config.learning_rate, steps_per_epoch)
    if not _chosen(config, "learning_rate"):
        rates = (config.learning_rate,)
    elif can_search:
        rates = tuple(config.head_learning_rates)
    else:
        rates = (FIXED_HEAD_LEARNING_RATE,)
    phase = _auto_phase(config, 1, "epochs", HEAD_BUDGET, steps_per_epoch, 0,
                        config.optimizer, rates[0])
    if phase is None:
        return None
    return dataclasses.replace(phase, learning_rates=rates if len(rates) > 1 else ())


def phase_two(config, steps_per_epoch: int, first_epoch: int,
              head_learning_rate: Optional[float]) -> Optional[Phase]:
    """Phase 2, or None when it has no steps.

    Args:
      config: the run's Config.
      steps_per_epoch: steps of one pass over the train split.
      first_epoch: the epochs phase 1 ran (phase 2's curves continue them).
      head_learning_rate: phase 1's (chosen) rate; None when phase 1 did not run.
    """
    if config.recipe == TUTORIAL:
        return _tutorial_phase(config, 2, config.epochs, config.fine_tune_epochs,
                               config.fine_tune_optimizer, config.fine_tune_learning_rate,
                               steps_per_epoch)
    if _chosen(config, "fine_tune_learning_rate"):
        rate = FINE_TUNE_RATIO * (head_learning_rate or FIXED_HEAD_LEARNING_RATE)
    else:
        rate = config.fine_tune_learning_rate
    return _auto_phase(config, 2, "fine_tune_epochs", FINE_TUNE_BUDGET, steps_per_epoch,
                       first_epoch, config.fine_tune_optimizer, rate)


def _tutorial_phase(config, number, first_epoch, epochs, optimizer, learning_rate,
                    steps_per_epoch) -> Optional[Phase]:
    if not epochs:
        return None
    return Phase(number, first_epoch, first_epoch + epochs, optimizer, learning_rate,
                 steps_per_epoch, config.early_stopping_patience)


def describe(phase: Phase) -> str:
    """One log line of a phase's schedule."""
    rates = (f"searching lr in {list(phase.learning_rates)}" if phase.learning_rates
             else f"lr {phase.learning_rate:g}")
    stop = (f", stops after {phase.patience} validations without a lower val_loss"
            if phase.patience else "")
    best = ", ends on its best weights" if phase.restore_best else ""
    return (f"Phase {phase.number}: {phase.optimizer} {rates}; up to {phase.steps} steps, "
            f"validated every {phase.steps_per_epoch}{stop}{best}.")


# --------------------------------------------------- The search, finished phases


def trial_result(learning_rate: float, history: Dict[str, List[float]],
                 steps_per_epoch: int) -> Dict:
    """One search run's row: its rate and its best validation epoch."""
    losses = history["val_loss"]
    best = min(range(len(losses)), key=lambda i: losses[i])
    return {"learning_rate": learning_rate, "val_loss": float(losses[best]),
            "val_accuracy": float(history["val_accuracy"][best]),
            "best_step": (best + 1) * steps_per_epoch, "steps_run": len(losses) * steps_per_epoch,
            "epochs": best + 1}


def best_trial(trials: Sequence[Dict]) -> Dict:
    """The row of lowest validation loss (the first of equals)."""
    return min(trials, key=lambda t: t["val_loss"])


def search_table(trials: Sequence[Dict]) -> str:
    """The search as a text table, chosen row marked."""
    chosen = best_trial(trials)
    lines = ["  learning rate   val_loss   val_accuracy   best step / run"]
    for t in trials:
        mark = "  <- chosen" if t is chosen else ""
        lines.append(f"  {t['learning_rate']:<13g} {t['val_loss']:9.4f} {t['val_accuracy']:13.4f}"
                     f"   {t['best_step']:>6d} / {t['steps_run']}{mark}")
    return "\n".join(lines)


def write_finished(folder: str, result: Dict) -> None:
    """Records a finished phase (its rate, history and any search rows) for a re-run."""
    import tensorflow as tf  # Here only: config imports this module for its constants.

    tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(f"{folder}/{FINISHED_FILE}", "w") as f:
        json.dump(result, f, indent=2)


def read_finished(folder: str) -> Optional[Dict]:
    """The record ``write_finished`` left in a phase's folder, or None."""
    import tensorflow as tf

    path = f"{folder}/{FINISHED_FILE}"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)
