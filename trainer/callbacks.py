"""Callbacks: epoch extras for TensorBoard, NaN guard, best weights, backups, hypertune.

``Backup`` backs up every N steps, at epoch ends and before preemption
(SIGTERM, see ``recovery.py``), and restores when a phase starts.

``RestoreBest`` ends a fit on the weights of its lowest validation loss, and
stops it after ``patience`` validations without one (the ``auto`` recipe).
``StopOnSigterm`` ends a fit that has nothing worth backing up (a run of the
head search) when a worker got SIGTERM.

``EpochExtras`` adds the learning rate, the phase and throughput to each
epoch's logs; because it runs before Keras's TensorBoard callback and shares
its logs dict, TensorBoard writes them next to loss and accuracy (as
``epoch_learning_rate``, ``epoch_phase``, ``epoch_images_per_second``), and
the chief-only logic of that callback applies to them too.
"""

import functools
import math
import time

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import recovery
from trainer import storage
from trainer import watchdog


class EpochExtras(keras.callbacks.Callback):
    """Adds learning_rate, phase and images_per_second to epoch logs."""

    def __init__(self, phase: int, global_batch_size: int):
        super().__init__()
        # Reads no batch logs: Keras need not copy them to Python after every
        # step (a wait for the step, which costs most on short steps).
        self._supports_tf_logs = True
        self._phase = phase
        self._global_batch_size = global_batch_size
        self._start = 0.0
        self._steps = 0
        self._train_seconds = None  # Set when validation starts, before epoch end.

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_test_begin(self, logs=None):
        # Throughput counts training steps only, not the validation pass.
        self._train_seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        seconds = self._train_seconds or (time.perf_counter() - self._start)
        self._train_seconds = None
        logs["learning_rate"] = _current_learning_rate(self.model.optimizer)
        logs["phase"] = float(self._phase)
        logs["images_per_second"] = self._steps * self._global_batch_size / max(seconds, 1e-9)


def _current_learning_rate(optimizer) -> float:
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(tf.keras.backend.get_value(lr) if not tf.is_tensor(lr) else lr.numpy())


class RaiseOnNaN(keras.callbacks.Callback):
    """Stops a broken run loudly instead of training on garbage.

    Checked per epoch: a per-step check would sync the host with the
    accelerator every step.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"Loss became {loss} in epoch {epoch + 1}; lower the learning "
                "rate or check the input data.")


class RestoreBest(keras.callbacks.Callback):
    """Tracks the lowest ``val_loss``; ends the fit on those weights.

    Unlike Keras's ``EarlyStopping(restore_best_weights=True)``, which
    restores only when it stopped the fit, the best weights are restored
    whenever the fit ends, also when it ran its whole budget past its best
    epoch. A non-finite loss stops the fit at once (a learning rate too high
    for a search candidate): the best weights so far, or the starting ones,
    remain.

    Args:
      patience: validations without a lower val_loss before stopping; 0 runs
        the whole budget (and still ends on the best weights).
    """

    def __init__(self, patience: int = 0):
        super().__init__()
        self._patience = patience
        self.best_loss = math.inf
        self.best_epoch = -1
        self._best_weights = None
        self._wait = 0

    def on_train_begin(self, logs=None):
        self.best_loss, self.best_epoch, self._wait = math.inf, -1, 0
        self._best_weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = float(logs.get("val_loss", math.nan))
        if not (math.isfinite(loss) and math.isfinite(float(logs.get("loss", 0.0)))):
            logging.warning("Non-finite loss at epoch %d: stopping on the best weights so far.",
                            epoch + 1)
            self.model.stop_training = True
            return
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self._wait = loss, epoch, 0
            self._best_weights = self.model.get_weights()
            return
        self._wait += 1
        if self._patience and self._wait >= self._patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
        if self.best_epoch >= 0:
            logging.info("Ended on the weights of epoch %d (val_loss %.4f).",
                         self.best_epoch + 1, self.best_loss)


def write_search_summaries(log_dir: str, trials) -> None:
    """TensorBoard hparams of a head search: one run per learning rate, beside its curves."""
    from tensorboard.plugins.hparams import api as hp

    for trial in trials:
        writer = tf.summary.create_file_writer(f"{log_dir}/lr_{trial['learning_rate']:g}")
        with writer.as_default(step=trial["best_step"]):
            hp.hparams({"learning_rate": trial["learning_rate"]})
            tf.summary.scalar("search/best_val_loss", trial["val_loss"])
            tf.summary.scalar("search/best_val_accuracy", trial["val_accuracy"])
        writer.close()


class StopOnSigterm(keras.callbacks.Callback):
    """Raises ``recovery.Preempted`` after the step at which any worker got SIGTERM."""

    def on_train_begin(self, logs=None):
        self._check = recovery.sigterm_check(self.model.distribute_strategy)

    def on_train_batch_end(self, batch, logs=None):
        if self._check():
            raise recovery.Preempted(recovery.sigterm_received(), 0, batch)


# A save_freq that never comes due. Backups are then taken at epoch ends and
# before preemption only, yet Keras treats them as step-level, which is what
# lets a backup taken mid-epoch resume mid-epoch.
_NO_STEP_BACKUPS = 2**62


class Backup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that also backs up at every epoch end and before preemption.

    Keras's callback with an integer ``save_freq`` backs up only every N
    steps, so a restart after a finished epoch could redo up to N steps. Here
    the epoch end is always backed up too, recorded as the epoch's last batch,
    which Keras restores as "start the next epoch". Checkpoints are kept
    after training: a finished phase restores as finished, so re-running a
    completed job goes straight to export.

    After every step it asks whether any worker got SIGTERM
    (``recovery.sigterm_check``); then every worker backs up at that step and
    ``recovery.Preempted`` ends the fit, without validation or an epoch-end
    backup, since the epoch is not finished. A restart continues after that
    step; its input pipeline starts afresh (Keras restores the counters, not
    the data iterator). Every backup and restore is logged with the phase's
    step, the optimizer's iteration count.

    Args:
      backup_dir: this phase's backup folder.
      every_steps: also back up every this many steps; 0: no step backups.
      phase: the phase number, for the log.
    """

    def __init__(self, backup_dir: str, every_steps: int = 0, phase: int = 0):
        super().__init__(backup_dir, save_freq=every_steps or _NO_STEP_BACKUPS,
                         delete_checkpoint=False)
        self._every_steps = every_steps
        self._phase = phase
        self._sigterm_check = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # Restores the backup, if any.
        self._sigterm_check = recovery.sigterm_check(self.model.distribute_strategy)
        if self._step():
            logging.info("Phase %d: resumed from %s at step %d.", self._phase,
                         self.backup_dir, self._step())

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if logging.vlog_is_on(1):  # Reading the step waits for it: only when asked (--v=1).
            logging.vlog(1, "Phase %d: step %d done.", self._phase, self._step())
        if self._sigterm_check():
            self._backup(self._current_epoch, batch, reason="preemption")
            raise recovery.Preempted(recovery.sigterm_received(), self._current_epoch, batch)

    def on_epoch_end(self, epoch, logs=None):
        self._batches_count = 0
        self._backup(epoch, self.params["steps"] - 1, reason="epoch end")

    def _backup(self, epoch, batch=0, reason=""):
        with storage.explain_failures(
                f"Phase {self._phase}: backing up to {self.backup_dir}",
                "The previous backup is intact (TensorFlow writes a checkpoint under a "
                "temporary name first); a restart resumes from it."), \
                watchdog.slow_section("backup"):
            super()._backup(epoch=epoch, batch=batch)
        logging.info("Phase %d: backed up at step %d (epoch %d, step %d of %d; %s).",
                     self._phase, self._step(), epoch + 1, batch + 1, self.params["steps"],
                     reason or f"every {self._every_steps} steps")

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())


class HypertuneReporter(keras.callbacks.Callback):
    """Reports one epoch metric to a Vertex AI hyperparameter tuning study.

    cloudml-hypertune writes the value where the tuning service reads it; the
    epoch number (continued across phases) is the measurement's step, so the
    study sees one curve per trial. The caller decides whether this process
    should report (the chief of a tuning trial), so nothing here reads the
    environment. A no-op when disabled, when ``metric`` is empty, or when
    cloudml-hypertune is not installed (the ``hypertune`` extra).

    Args:
      metric: the epoch log to report, e.g. ``val_accuracy``; "" disables.
      enabled: whether this process reports (the chief of a tuning trial).
      client: a ``hypertune.HyperTune``; by default one shared by the whole
        process, because each client rewrites the metric file with only its
        own reports and every phase makes a new callback.
    """

    def __init__(self, metric: str, enabled: bool, client=None,
                 best: "RestoreBest" = None):
        super().__init__()
        self._metric = metric
        self._client = None
        self._best = best
        self._reported = {}
        if enabled and metric:
            self._client = client or _shared_hypertune_client()

    def on_epoch_end(self, epoch, logs=None):
        if self._client is None:
            return
        logs = logs or {}
        if self._metric not in logs:
            # A study fed nothing fails every trial at the end; fail this one now.
            raise KeyError(f"--hypertune_metric={self._metric!r} is not an epoch metric; "
                           f"this epoch logged {sorted(logs)}.")
        self._report(float(logs[self._metric]), epoch + 1)

    def on_train_end(self, logs=None):
        # With ``best`` (a RestoreBest), the fit ends on its best epoch's weights: that
        # epoch's value is reported once more, last, so that a study judging trials by
        # their last measurement judges the weights that are exported.
        if self._client is None or self._best is None or self._best.best_epoch < 0:
            return
        if self._best.best_epoch in self._reported:
            self._report(self._reported[self._best.best_epoch], max(self._reported) + 2)

    def _report(self, value: float, step: int) -> None:
        self._reported[step - 1] = value
        self._client.report_hyperparameter_tuning_metric(
            hyperparameter_metric_tag=self._metric, metric_value=value, global_step=step)


@functools.lru_cache(maxsize=None)
def _shared_hypertune_client():
    try:
        import hypertune  # The optional `hypertune` extra.
    except ImportError:
        logging.warning("cloudml-hypertune is not installed: the tuning study gets no "
                        "metric. Install transfer-trainer[hypertune].")
        return None
    return hypertune.HyperTune()
