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
import math
import os
import tempfile
from typing import Dict, Iterator, List, Optional

import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import callbacks as callbacks_lib
from trainer import cluster
from trainer import config as config_lib
from trainer import evaluate
from trainer import export
from trainer import features
from trainer import figures
from trainer import model as model_lib
from trainer import schedules
from trainer import tflite
from trainer.data import pipeline
from trainer.data import screen
from trainer.data import weighting


_OPTIMIZERS = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
               "sgd": keras.optimizers.SGD}


@dataclasses.dataclass(frozen=True)
class Phase:
    """One fit: its epochs [first_epoch, last_epoch), optimizer and learning rate."""

    number: int
    first_epoch: int
    last_epoch: int
    optimizer: str
    learning_rate: float


def phases(config: config_lib.Config) -> List[Phase]:
    """The recipe's phases; a phase with no epochs is left out."""
    all_phases = [
        Phase(1, 0, config.epochs, config.optimizer, config.learning_rate),
        Phase(2, config.epochs, config.epochs + config.fine_tune_epochs,
              config.fine_tune_optimizer, config.fine_tune_learning_rate),
    ]
    return [p for p in all_phases if p.last_epoch > p.first_epoch]


def train_and_evaluate(config: config_lib.Config, strategy: tf.distribute.Strategy,
                       info: Optional[cluster.ClusterInfo] = None) -> Dict:
    """Trains, exports and evaluates; returns the final metrics (chief) or {}."""
    info = info or cluster.ClusterInfo()
    tf.keras.utils.set_random_seed(config.seed)
    # Global in Keras: set every run, so a float32 run after a mixed one is float32.
    keras.mixed_precision.set_global_policy(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)

    # ---------------------------------------------------------------- Input
    data = pipeline.describe(config.data_dir, config.test_fraction, config.seed,
                             config.split_fractions, config.strict, config.flatten_nested)
    data = screen.screen(data, config.data_dir,
                         f"{config.job_dir}/{screen.REPORT}" if info.is_chief else "")
    class_weights = weighting.class_weights(data.splits["train"].labels, data.class_names,
                                            config.class_weighting)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
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
    with _local_weights(config.weights) as weights, strategy.scope():
        model = model_lib.create_model(
            config.backbone, data.num_classes, config.image_size, config.dropout,
            weights=weights, augment=config.augment and not config.jit_compile,
            seed=config.seed)
    if info.is_chief:
        config_lib.write_config(config, config.job_dir)

    # -------------------------------------------------------------- Phases
    history: Dict[str, list] = {}
    frozen = features.FrozenWork(
        model, [train_split, data.splits["validation"]], strategy, info, global_batch,
        config.seed, config.fine_tune_at,
        config.fine_tune_cache and config.fine_tune_epochs > 0, config.augment,
        config.fine_tune_cache_max_gb * 1e9, class_weights)
    for phase in phases(config):
        model_lib.set_trainable_for_phase(model, phase.number, config.fine_tune_at)
        if phase.number == 1 and config.feature_cache:
            fit = frozen.phase_one()
        elif phase.number == 2 and frozen.fine_tune:
            fit = frozen.phase_two()
        else:
            fit = (model, train_data, validation_data)
        result = _run_phase(*fit, phase, config, strategy, info, data.num_classes,
                            steps_per_epoch, global_batch, validation_steps=validation_steps)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)

    # -------------------------------------------------------------- Export
    model_dir = cluster.worker_dir(config.model_dir, info)
    export.export_model(model, data.class_names, config.image_size, model_dir)
    if not info.is_chief:
        tf.io.gfile.rmtree(model_dir)
        return {}

    # ------------------------------------------------------------ Evaluate
    metrics = evaluate.evaluate_splits(config.model_dir, data, config.image_size)
    metrics["history"] = history
    evaluate.write_metrics(metrics, f"{config.job_dir}/metrics.json")
    evaluate.write_summaries(metrics, config.model_dir, data, config.image_size,
                             f"{config.log_dir}/evaluation", evaluate.hparams_of(config),
                             step=config.epochs + config.fine_tune_epochs)
    figures.save_learning_curves(history, f"{config.job_dir}/{figures.LEARNING_CURVES_FILE}")
    if config.export_tflite:
        tflite.export_tflite(config.model_dir, f"{config.job_dir}/tflite")
    return metrics


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


def _run_phase(model, train_data, validation_data, phase: Phase, config, strategy, info,
               num_classes, steps_per_epoch, global_batch, validation_steps=None):
    """Compiles ``model`` for the phase and fits it, resuming from the phase's backup."""
    with strategy.scope():
        loss, metrics = model_lib.loss_and_metrics(num_classes, config.label_smoothing)
        learning_rate = schedules.learning_rate(
            config.lr_schedule, phase.learning_rate,
            total_steps=(phase.last_epoch - phase.first_epoch) * steps_per_epoch,
            warmup_steps=round(config.warmup_epochs * steps_per_epoch))
        optimizer = _OPTIMIZERS[phase.optimizer](learning_rate)
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                      jit_compile=config.jit_compile)
    backup_dir = f"{config.checkpoint_dir}/phase{phase.number}"
    if tf.io.gfile.exists(backup_dir):
        logging.info("Phase %d: resuming from %s.", phase.number, backup_dir)
    logging.info("Phase %d: epochs %d-%d, %s lr %g, %d trainable weights.",
                 phase.number, phase.first_epoch + 1, phase.last_epoch, phase.optimizer,
                 phase.learning_rate, len(model.trainable_weights))
    callbacks = [
        callbacks_lib.EpochExtras(phase.number, global_batch),
        callbacks_lib.RaiseOnNaN(),
        callbacks_lib.Backup(backup_dir, config.checkpoint_every_steps, phase.number),
        keras.callbacks.TensorBoard(config.log_dir, write_graph=False, profile_batch=0),
        # Only the chief of a Vertex AI tuning trial reports the study's metric.
        callbacks_lib.HypertuneReporter(config.hypertune_metric,
                                        enabled=info.is_chief and bool(info.trial)),
    ]
    if config.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            "val_loss", patience=config.early_stopping_patience, restore_best_weights=True,
            verbose=1))
    return model.fit(train_data, epochs=phase.last_epoch, initial_epoch=phase.first_epoch,
                     steps_per_epoch=steps_per_epoch, validation_data=validation_data,
                     validation_steps=validation_steps,
                     callbacks=callbacks, verbose=2)


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
