"""train_and_evaluate: the two-phase transfer-learning recipe, resumable.

Phase 1 trains the head on a frozen backbone (Adam); phase 2 unfreezes the
backbone from ``fine_tune_at`` on and continues at a lower learning rate
(RMSprop). Phase 2 continues the epoch count, so TensorBoard curves join.

Each phase backs up its state (weights, optimizer, epoch and step) under
``checkpoint_dir/phase<N>``; re-running the same command restores it, and a
finished phase restores as finished. Only the chief writes summaries, the
config, the model and the metrics; other workers write to scratch folders.
"""

import contextlib
import dataclasses
import functools
import math
import os
import tempfile
from typing import Dict, Iterator, List, Optional

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import artifacts
from trainer import callbacks as callbacks_lib
from trainer import cluster
from trainer import config as config_lib
from trainer import evaluate
from trainer import export
from trainer import figures
from trainer import frozen_work
from trainer import model as model_lib
from trainer import multi_label
from trainer import onnx_export
from trainer import preflight
from trainer import recipe
from trainer import resume_guard
from trainer import schedules
from trainer import tflite
from trainer import thresholds as thresholds_lib
from trainer import watchdog
from trainer.data import image_sizes
from trainer.data import pipeline
from trainer.data import screen
from trainer.data import shard_check
from trainer.data import weighting


_OPTIMIZERS = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
               "sgd": keras.optimizers.SGD}


def phases(config: config_lib.Config, steps_per_epoch: int = 1) -> List[recipe.Phase]:
    """The phases of a fixed (tutorial) schedule; a phase with no epochs is left out."""
    one = recipe.phase_one(config, steps_per_epoch, can_search=False)
    two = recipe.phase_two(config, steps_per_epoch, one.last_epoch if one else 0,
                           one.learning_rate if one else None)
    return [p for p in (one, two) if p]


def train_and_evaluate(config: config_lib.Config, strategy: tf.distribute.Strategy,
                       info: Optional[cluster.ClusterInfo] = None) -> Dict:
    """Trains, exports and evaluates; returns the final metrics (chief) or {}.

    Raises:
      resume_guard.ResumeMismatch: the job dir holds backups of another run.
      pipeline.DataError: the data cannot be trained on (a corrupt shard is named).
    """
    with shard_check.naming_corrupt_shards(config.data_dir):
        return _train_and_evaluate(config, strategy, info or cluster.ClusterInfo())


def _train_and_evaluate(config: config_lib.Config, strategy: tf.distribute.Strategy,
                        info: cluster.ClusterInfo) -> Dict:
    tf.keras.utils.set_random_seed(config.seed)
    # Global in Keras: set every run, so a float32 run after a mixed one is float32.
    keras.mixed_precision.set_global_policy(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)

    # ---------------------------------------------------------------- Input
    data = pipeline.describe(config.data_dir, config.test_fraction, config.seed,
                             config.split_fractions, config.strict, config.flatten_nested)
    task = multi_label.resolve_task(config.task, data.has_multi_label, config.data_dir)
    data = data.with_task(task == multi_label.MULTI_LABEL)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    # Before any image is read: backups of another run must not resume into this one.
    # (--task as given: what auto chooses follows the data, which counts on its own.)
    resume_guard.check(config, data, global_batch, info, strategy)
    config = config.replace(task=task)  # config.json records the task trained.
    data = screen.screen(data, config.data_dir,
                         f"{config.job_dir}/{screen.REPORT}" if info.is_chief else "",
                         max_pixels=config.max_image_pixels, memo_dir=config.cache_dir)
    # Multi-label: balanced weighting weighs each class's positives in the loss instead.
    positive_weights = (multi_label.positive_weights(data, config.class_weighting)
                        if data.multi_label else None)
    class_weights = None if data.multi_label else weighting.class_weights(
        data.splits["train"].labels, data.class_names, config.class_weighting)
    config = _choose_image_size(config, data.splits["train"])
    train_split = data.splits["train"]
    steps_per_epoch = max(1, math.ceil(train_split.count / global_batch))
    train_data = _distribute(strategy, train_split, config, training=True,
                             class_weights=class_weights)
    validation_data = _distribute(strategy, data.splits["validation"], config, training=False)
    validation_steps = _validation_steps(data.splits["validation"].count, global_batch)
    logging.info("Classes %s; %d train images, %d steps of %d per epoch.",
                 list(data.class_names), train_split.count, steps_per_epoch, global_batch)

    # ------------------------------------------------------ Model and outputs
    if config.weights == "none" and config.epochs:
        logging.warning("--weights=none: phase 1 trains a head on random, frozen "
                        "features; expect chance accuracy unless phase 2 trains the backbone.")
    with _local_weights(config.weights) as weights, strategy.scope(), \
            preflight.explain_weights_download(config.backbone, config.image_size):
        model = model_lib.create_model(
            config.backbone, data.num_classes, config.image_size, config.dropout,
            weights=weights, augment=config.augment and not config.jit_compile,
            seed=config.seed, multi_label=data.multi_label)
    if info.is_chief:
        config_lib.write_config(config, config.job_dir)

    # -------------------------------------------------------------- Phases
    history: Dict[str, list] = {}
    frozen = frozen_work.FrozenWork(
        model, [train_split, data.splits["validation"]], strategy, info, global_batch,
        config.seed, config.fine_tune_at,
        config.fine_tune_cache and config.fine_tune_epochs > 0, config.augment,
        config.fine_tune_cache_max_gb * 1e9, class_weights, config.cache_dir,
        config.cache_spill_dir, config.backbone)
    run = functools.partial(_Runner, config=config, strategy=strategy, info=info,
                            num_classes=data.num_classes, global_batch=global_batch,
                            validation_steps=validation_steps,
                            head=(data.multi_label, positive_weights))
    can_search = config.feature_cache and not isinstance(strategy, tf.distribute.TPUStrategy)
    if config.recipe == recipe.AUTO and not can_search:
        logging.info("--recipe=auto: no head search (%s); phase 1 trains at one fixed rate.",
                     "--feature_cache=false" if not config.feature_cache else "TPU")
    chosen = {}
    one = recipe.phase_one(config, steps_per_epoch, can_search)
    if one:
        model_lib.set_trainable_for_phase(model, 1, config.fine_tune_at)
        fit = (frozen.phase_one() if config.feature_cache
               else (model, train_data, validation_data))
        one, result, chosen = run(phase=one, fit=fit).run()
        _extend(history, result)
    two = recipe.phase_two(config, steps_per_epoch,
                           first_epoch=len(history.get("loss", [])) if one else 0,
                           head_learning_rate=one.learning_rate if one else None)
    if two and config.fine_tune_epochs:
        model_lib.set_trainable_for_phase(model, 2, config.fine_tune_at)
        fit = frozen.phase_two() if frozen.fine_tune else (model, train_data, validation_data)
        _, result, _ = run(phase=two, fit=fit).run()
        _extend(history, result)

    # -------------------------------------------------------------- Export
    model_dir = cluster.worker_dir(config.model_dir, info)
    # Multi-label: each class's threshold, chosen on validation, is saved with the model.
    thresholds = (thresholds_lib.choose(model, data.splits["validation"], config)
                  if data.multi_label else None)
    served = export.export_model(model, data.class_names, config.image_size, model_dir,
                                 thresholds=thresholds)
    if not info.is_chief:
        tf.io.gfile.rmtree(model_dir)
        return {}

    # ------------------------------------------------------------ Evaluate
    predictions = evaluate.predict_splits(served, data, config.image_size)
    metrics = evaluate.split_metrics(predictions, data, thresholds_lib.read(served))
    metrics["model"] = served  # The folder to serve or upload (trainer/export.py).
    metrics["history"] = history
    metrics["frozen_work"] = frozen.sources  # Computed or read from --cache_dir.
    metrics["recipe"] = {"name": config.recipe, "phases": [
        dataclasses.asdict(p) for p in (one, two) if p], **chosen}
    evaluate.write_metrics(metrics, f"{config.job_dir}/metrics.json")
    chosen_rates = {f"chosen_{name}": p.learning_rate for name, p in
                    (("learning_rate", one), ("fine_tune_learning_rate", two)) if p}
    evaluate.write_summaries(metrics, served, data, config.image_size,
                             f"{config.log_dir}/evaluation",
                             {**evaluate.hparams_of(config), **chosen_rates},
                             step=len(history.get("loss", [])), predictions=predictions,
                             mistakes_png=f"{config.job_dir}/{evaluate.MISTAKES_FILE}")
    figures.save_learning_curves(history, f"{config.job_dir}/{figures.LEARNING_CURVES_FILE}")
    _export_for_devices(config, served, data, metrics)
    return metrics


def _export_for_devices(config: config_lib.Config, served: str,
                        data: pipeline.DatasetInfo, metrics: Dict) -> None:
    """TFLite and ONNX exports of the SavedModel in ``served``, when asked, each
    measured by its runtime on the test split (validation without one);
    metrics.json is rewritten with ``exports``."""
    if config.export_tflite:
        tflite.export_tflite(served, f"{config.job_dir}/tflite",
                             calibration_split=data.splits["train"])
    if config.export_onnx:
        onnx_export.export_onnx(served, f"{config.job_dir}/onnx")
    found = artifacts.find_artifacts(config.job_dir)
    if not (config.export_tflite or config.export_onnx) or not found:
        return
    split = next(data.splits[s] for s in ("test", "validation")
                 if s in data.splits and data.splits[s].count)
    metrics["exports"] = artifacts.measure(served, found, split, config.image_size)
    evaluate.write_metrics(metrics, f"{config.job_dir}/metrics.json")


def _choose_image_size(config: config_lib.Config, train: pipeline.Split) -> config_lib.Config:
    """The config with the input side ``recipe.image_size`` chooses (logged when it changes)."""
    native = model_lib.BACKBONES[config.backbone].native_size
    if config.recipe != recipe.AUTO or "image_size" in config.recipe_pinned or not native:
        return config
    median = image_sizes.median_short_side(train)
    size = recipe.image_size(config, native, median)
    logging.info("--recipe=auto: train images' median shorter side %s px: input side %d%s.",
                 median, size, " (the backbone's native size)" if size == native else "")
    return config.replace(image_size=size)


def _validation_steps(count: int, global_batch: int) -> int:
    """Validation batches per epoch: one pass over the split.

    Keras needs a step count for distributed datasets, and does not restart
    their iterators between epochs, so validation datasets repeat and each
    epoch takes one pass. Every worker runs the same number of steps (each
    step all-reduces): a worker whose share is smaller wraps into its next
    pass, so under MultiWorkerMirroredStrategy a few images can count twice
    in an epoch's validation. The final metrics are exact: they come from the
    exported model on the chief.
    """
    return max(1, math.ceil(count / global_batch))


def _distribute(strategy, split, config, training, class_weights=None):
    # Under XLA, augmentation runs here rather than in the compiled model.
    augment = (model_lib.augmentation(config.seed)
               if training and config.augment and config.jit_compile else None)

    def dataset_fn(input_context):
        return pipeline.make_dataset(
            split, config.image_size, input_context.get_per_replica_batch_size(
                config.batch_size * strategy.num_replicas_in_sync),
            training=training, input_context=input_context, cache=config.cache,
            shuffle_buffer=config.shuffle_buffer, seed=config.seed, repeat=True,
            augment=augment, class_weights=class_weights)
    return strategy.distribute_datasets_from_function(dataset_fn)


def _extend(history: Dict[str, list], result: Dict[str, list]) -> None:
    for key, values in result.items():
        history.setdefault(key, []).extend(values)


class _Runner:
    """Runs one phase over ``fit`` = (model, train data, validation data).

    A phase of ``learning_rates`` is a head search: one short fit per rate,
    the head reset before each; it ends on the best run's weights. Phases of
    the ``auto`` recipe record themselves when finished (``_finish``), so a
    re-run restores their final weights instead of training again.
    """

    def __init__(self, phase: recipe.Phase, fit, config, strategy, info, num_classes,
                 global_batch, validation_steps, head=(False, None)):
        self.phase, self.config, self.strategy, self.info = phase, config, strategy, info
        self.model, self.train_data, self.validation_data = fit
        self.num_classes, self.global_batch = num_classes, global_batch
        self.validation_steps = validation_steps
        self.multi_label, self.positive_weights = head  # The head's task, its label weights.
        self.folder = f"{config.checkpoint_dir}/phase{phase.number}"

    def run(self):
        """(the phase as run, its history, what it chose) -- restored when finished before."""
        logging.info("%s", recipe.describe(self.phase))
        if self.phase.restore_best:
            finished = recipe.read_finished(self.folder)
            if finished:
                logging.info("Phase %d: finished before; restoring its final weights.",
                             self.phase.number)
                self.model.load_weights(f"{self.folder}/final/weights")
                return (self.phase.with_rate(finished["learning_rate"]), finished["history"],
                        {k: v for k, v in finished.items() if k == "search"})
        if self.phase.learning_rates:
            phase, history, chosen = self._search()
        else:
            phase, history, chosen = self.phase, self._fit(self.phase).history, {}
        if self.phase.restore_best:
            self._finish(phase, history, chosen)
        return phase, history, chosen

    def _search(self):
        start = self.model.get_weights()
        trials, best_weights, histories = [], None, {}
        for rate in self.phase.learning_rates:
            self.model.set_weights(start)
            history = self._fit(self.phase.with_rate(rate), trial=True).history
            trial = recipe.trial_result(rate, history, self.phase.steps_per_epoch)
            if best_weights is None or trial["val_loss"] < recipe.best_trial(trials)["val_loss"]:
                best_weights = self.model.get_weights()
            trials.append(trial)
            histories[rate] = history
        best = recipe.best_trial(trials)
        self.model.set_weights(best_weights)
        logging.info("Phase 1 search, on validation:\n%s", recipe.search_table(trials))
        if self.info.is_chief:
            callbacks_lib.write_search_summaries(f"{self.config.log_dir}/search", trials)
        return (self.phase.with_rate(best["learning_rate"]), histories[best["learning_rate"]],
                {"search": trials})

    def _finish(self, phase, history, chosen):
        """Saves the phase's final weights, then (chief) its record: the phase is done."""
        weights_dir = cluster.worker_dir(f"{self.folder}/final", self.info)
        self.model.save_weights(f"{weights_dir}/weights")
        if self.info.is_chief:
            recipe.write_finished(self.folder, {"learning_rate": phase.learning_rate,
                                              "history": history, **chosen})
        else:
            tf.io.gfile.rmtree(weights_dir)

    def _fit(self, phase: recipe.Phase, trial: bool = False):
        """Compiles the model for ``phase`` and fits it (resuming from its backup unless a
        search ``trial``, which is cheap to redo)."""
        config = self.config
        with self.strategy.scope():
            loss, metrics = (
                multi_label.loss_and_metrics(self.num_classes, config.label_smoothing,
                                             self.positive_weights) if self.multi_label
                else model_lib.loss_and_metrics(self.num_classes, config.label_smoothing))
            learning_rate = schedules.learning_rate(
                config.lr_schedule, phase.learning_rate, total_steps=phase.steps,
                warmup_steps=round(config.warmup_epochs * phase.steps_per_epoch))
            optimizer = _OPTIMIZERS[phase.optimizer](learning_rate)
            self.model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                               jit_compile=config.jit_compile)
        if trial:
            # EpochExtras: the chosen run's history has every key that phase 2's has.
            callbacks = [watchdog.StepWatchdog(),
                         callbacks_lib.EpochExtras(phase.number, self.global_batch),
                         callbacks_lib.StopOnSigterm(),
                         callbacks_lib.RestoreBest(phase.patience),
                         keras.callbacks.TensorBoard(
                             f"{config.log_dir}/search/lr_{phase.learning_rate:g}",
                             write_graph=False, profile_batch=0)]
        else:
            callbacks = self._callbacks(phase)
        logging.info("Phase %d: epochs %d-%d, %s lr %g, %d trainable weights.",
                     phase.number, phase.first_epoch + 1, phase.last_epoch, phase.optimizer,
                     phase.learning_rate, len(self.model.trainable_weights))
        try:
            return self.model.fit(
                self.train_data, epochs=phase.last_epoch, initial_epoch=phase.first_epoch,
                steps_per_epoch=phase.steps_per_epoch, validation_data=self.validation_data,
                validation_steps=self.validation_steps, callbacks=callbacks,
                verbose=0 if trial else 2)
        finally:
            watchdog.disarm()  # Also when fit raises: Keras then skips on_train_end.

    def _callbacks(self, phase: recipe.Phase) -> list:
        config, info = self.config, self.info
        backup_dir = self.folder
        if tf.io.gfile.exists(backup_dir):
            logging.info("Phase %d: resuming from %s.", phase.number, backup_dir)
        best = callbacks_lib.RestoreBest(phase.patience) if phase.restore_best else None
        callbacks = [
            watchdog.StepWatchdog(),  # First: it arms before the backup is restored.
            callbacks_lib.EpochExtras(phase.number, self.global_batch),
            callbacks_lib.RaiseOnNaN(),
            *([best] if best else []),
            callbacks_lib.Backup(backup_dir, config.checkpoint_every_steps, phase.number),
            keras.callbacks.TensorBoard(config.log_dir, write_graph=False, profile_batch=0),
            # Only the chief of a Vertex AI tuning trial reports the study's metric.
            callbacks_lib.HypertuneReporter(config.hypertune_metric,
                                            enabled=info.is_chief and bool(info.trial),
                                            best=best),
        ]
        if not best and phase.patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                "val_loss", patience=phase.patience, restore_best_weights=True, verbose=1))
        return callbacks


@contextlib.contextmanager
def _local_weights(weights: str) -> Iterator[Optional[str]]:
    """'imagenet', None, or a local path of a weights file, for the ``with`` block.

    h5py cannot read gs://, so a gs:// file is copied to a temporary folder,
    removed when the block ends.
    """
    if weights == "none":
        yield None
    elif weights == "imagenet" or not weights.startswith("gs://"):
        yield weights
    else:
        with tempfile.TemporaryDirectory(prefix="weights_") as folder:
            local = os.path.join(folder, os.path.basename(weights))
            tf.io.gfile.copy(weights, local, overwrite=True)
            yield local
