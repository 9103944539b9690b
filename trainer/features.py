"""Phase-1 feature cache: backbone features computed once per image.

In phase 1 the backbone is frozen and runs in inference mode, so its pooled
features for an image never change. Recomputing them every epoch (as the
tutorial does) spends nearly all of phase 1 in the backbone's forward pass.
Here each worker runs the backbone once over its own share of the train and
validation images, and phase 1 trains the head (dropout + logits, the very
layers of the full model) on those cached vectors.

The price: phase 1 sees no augmentation (the cached features are of the
un-augmented images); phase 2 augments as usual. Measured on the tutorial's
cats-vs-dogs data in benchmarks/recipe.py.
"""

import time
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import cluster
from trainer import model as model_lib
from trainer.data import pipeline

_EXTRACT_BATCH = 64


def head_model(model: keras.Model) -> keras.Model:
    """pooled features -> logits, sharing the full model's dropout and logit layers.

    Build it inside the strategy's scope of ``model``.
    """
    pooled = model.get_layer(model_lib.POOL_LAYER)
    inputs = keras.Input(pooled.output_shape[1:], name="features")
    x = model.get_layer(model_lib.DROPOUT_LAYER)(inputs)
    outputs = model.get_layer(model_lib.LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name="head")


def input_context(info: cluster.ClusterInfo,
                  strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This worker's input pipeline, numbered as tf.distribute numbers them.

    MultiWorkerMirroredStrategy numbers the chief 0 and workers after it, so
    the features a worker extracts are the very share that its training
    pipeline reads.
    """
    if not info.is_multi_worker:
        index = 0
    elif info.task_type in ("chief", "master"):
        index = 0
    else:
        index = info.task_id + (1 if info.has_chief_task else 0)
    return tf.distribute.InputContext(num_input_pipelines=info.num_workers,
                                      input_pipeline_id=index,
                                      num_replicas_in_sync=strategy.num_replicas_in_sync)


def extract(model: keras.Model, splits: Sequence[pipeline.Split], image_size: int,
            context: tf.distribute.InputContext) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Pooled features [n, d] and labels [n] of this worker's share of each split.

    Runs locally on each worker (no collective ops): reading a mirrored
    variable outside a replica context reads this worker's copy. One traced
    forward function (any batch size) serves every split.
    """
    pooled = keras.Model(model.input, model.get_layer(model_lib.POOL_LAYER).output)
    forward = tf.function(lambda images: pooled(images, training=False), input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    return [_extract_split(forward, split, image_size, context) for split in splits]


def _extract_split(forward, split, image_size, context):
    images = pipeline.make_dataset(split, image_size, _EXTRACT_BATCH, training=False,
                                   input_context=context, cache="none")
    start = time.perf_counter()
    features, labels = [], []
    for batch, batch_labels in images:
        features.append(forward(batch).numpy())
        labels.append(batch_labels.numpy())
    seconds = time.perf_counter() - start
    logging.info("Feature cache: %d %s images in %.1f s (%.0f images/s).", sum(map(len, labels)),
                 split.name, seconds, sum(map(len, labels)) / max(seconds, 1e-9))
    return np.concatenate(features), np.concatenate(labels)


def distribute(strategy: tf.distribute.Strategy, features: np.ndarray, labels: np.ndarray,
               global_batch: int, training: bool, seed: int,
               context: tf.distribute.InputContext) -> tf.distribute.DistributedDataset:
    """A distributed dataset over this worker's cached features."""

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        if ctx.input_pipeline_id != context.input_pipeline_id:
            raise RuntimeError(
                f"Feature cache of input pipeline {context.input_pipeline_id} asked for "
                f"pipeline {ctx.input_pipeline_id}.")
        ds = tf.data.Dataset.from_tensor_slices((features, labels))
        if training:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=training)
        if not training:
            ds = ds.repeat()  # Validation in fit: whole passes, a fixed step count.
        return ds.prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)
