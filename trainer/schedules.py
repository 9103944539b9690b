"""Learning-rate schedules of a phase: constant (the recipe) or cosine, after a warmup.

A schedule spans one phase. Each phase compiles a fresh optimizer whose
step counter starts at 0 (and is restored with the optimizer on resume), so
the schedule reads that counter directly: phase 2 warms up and decays from
its own ``fine_tune_learning_rate`` over its own steps.
"""

import math
from typing import Union

import tensorflow as tf
import tf_keras as keras

CONSTANT = "constant"
COSINE = "cosine"
SCHEDULES = (CONSTANT, COSINE)


class WarmupThen(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``base`` over ``warmup_steps``, then constant or cosine to 0.

    Step ``s`` (0-based) of the warmup uses ``base * (s + 1) / warmup_steps``,
    so the first step already learns. The cosine runs over the steps after
    the warmup and reaches 0 at ``total_steps``.
    """

    def __init__(self, base: float, warmup_steps: int, total_steps: int, decay: str):
        super().__init__()
        self.base = base
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = tf.constant(self.base, tf.float32)
        warmup = float(self.warmup_steps)
        if self.decay == COSINE:
            decay_steps = float(max(1, self.total_steps - self.warmup_steps))
            progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
            after = base * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            after = base
        if not self.warmup_steps:
            return after
        return tf.where(step < warmup, base * (step + 1.0) / warmup, after)

    def get_config(self):
        return {"base": self.base, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "decay": self.decay}


def learning_rate(name: str, base: float, total_steps: int,
                  warmup_steps: int = 0) -> Union[float, WarmupThen]:
    """The learning rate to hand to a phase's optimizer.

    Args:
      name: 'constant' or 'cosine' (SCHEDULES).
      base: the phase's peak learning rate.
      total_steps: optimizer steps in the phase.
      warmup_steps: steps of linear warmup at the start of the phase, clipped
        to the phase's length.

    Returns:
      ``base`` itself for a constant rate without warmup (exactly the
      recipe), otherwise a schedule.
    """
    if name not in SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {name!r}; use one of {SCHEDULES}.")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if name == CONSTANT and not warmup_steps:
        return base
    return WarmupThen(base, warmup_steps, total_steps, name)
