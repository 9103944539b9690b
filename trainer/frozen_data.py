"""Distributed datasets over the cached frozen work: from memory, or streamed from files.

Both sources give the same elements in the same order: (outputs, label),
or ((outputs, flipped outputs), label) with flip views, of which each train
element takes one at random (the recipe's random flip). Train data is
shuffled with the run's seed and repeats; validation is read in order, in
whole passes.

* In memory: the arrays of this worker's share, shuffled over all of them.
* Streamed (``distribute_entries``): the records of this worker's part of
  store entries (trainer/cache_store.py), read through ``tf.data`` in the
  cached dtype. Memory stays flat in the number of images: a train pass
  whose share exceeds ``shuffle_buffer`` elements reads the shards in a new
  random order each pass (two at a time, interleaved) into a shuffle
  buffer of that many elements. A share that fits the buffer is shuffled
  whole, exactly as in memory, so the two sources train identically.
"""

from typing import Optional, Sequence, Tuple

import tensorflow as tf

from trainer import cache_store
from trainer.data import pipeline

_INTERLEAVE = 2  # Shards read at once by a streamed train pass.


def distribute(strategy: tf.distribute.Strategy, cached, global_batch: int, training: bool,
               seed: int, context: tf.distribute.InputContext,
               flipped: Optional[Tuple[tf.Tensor, ...]] = None,
               class_weights: Optional[Sequence[float]] = None
               ) -> tf.distribute.DistributedDataset:
    """A distributed dataset over this worker's cached arrays ``(outputs, labels)``.

    With ``flipped`` (the same arrays of the horizontally flipped images),
    each element takes either view with probability 1/2. With
    ``class_weights``, batches carry each example's class weight as a third
    element, as the image pipeline's do.
    """
    arrays, labels = cached

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        _check_pipeline(ctx, context)
        inputs = _model_input(arrays)
        if flipped is not None:
            inputs = (inputs, _model_input(flipped))
        ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
        if training:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat()
        return _batched(ds, ctx, global_batch, training, seed, flipped is not None,
                        class_weights)

    return strategy.distribute_datasets_from_function(dataset_fn)


def distribute_entries(strategy: tf.distribute.Strategy,
                       entries: Sequence[cache_store.Entry], split: str, global_batch: int,
                       training: bool, seed: int, context: tf.distribute.InputContext,
                       shuffle_buffer: int,
                       class_weights: Optional[Sequence[float]] = None
                       ) -> tf.distribute.DistributedDataset:
    """A distributed dataset streamed from this worker's part of ``entries``' ``split``.

    ``entries``: one entry, or an entry and its flipped view's (same
    shards), read side by side. ``shuffle_buffer``: elements held for
    shuffling train data.
    """
    count = entries[0].count(split)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        _check_pipeline(ctx, context)
        if training and count > shuffle_buffer:
            ds = stream(entries, split, seed).shuffle(shuffle_buffer, seed=seed)
        else:
            ds = stream(entries, split)
            if training:
                ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
        return _batched(ds, ctx, global_batch, training, seed, len(entries) > 1,
                        class_weights)

    return strategy.distribute_datasets_from_function(dataset_fn)


def stream(entries: Sequence[cache_store.Entry], split: str,
           seed: Optional[int] = None) -> tf.data.Dataset:
    """Elements of ``split``'s records: in order, or (with ``seed``) in a new shard order
    each pass, repeated forever."""
    shards = [entry.paths(split) for entry in entries]
    if any(e.shard_records(split) != entries[0].shard_records(split) for e in entries):
        raise ValueError(f"Cache entries {[e.folder for e in entries]} have different "
                         f"shards of {split}; they cannot be read side by side.")
    tables = [tf.constant(paths) for paths in shards]
    order = tf.data.Dataset.range(len(shards[0]))
    if seed is not None:
        order = order.shuffle(len(shards[0]), seed=seed, reshuffle_each_iteration=True).repeat()

    def read(index):
        views = [entry.batches(tf.gather(table, index)).unbatch()
                 for entry, table in zip(entries, tables)]
        if len(views) == 1:
            return views[0].map(lambda outputs, label: (_model_input(outputs), label))
        return tf.data.Dataset.zip(tuple(views)).map(_joined_views)

    return order.interleave(read, cycle_length=_INTERLEAVE if seed is not None else 1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _joined_views(*views):
    (original, label), (flipped, _) = views
    return (_model_input(original), _model_input(flipped)), label


def _batched(ds: tf.data.Dataset, ctx: tf.distribute.InputContext, global_batch: int,
             training: bool, seed: int, flip: bool,
             class_weights: Optional[Sequence[float]]) -> tf.data.Dataset:
    if flip:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed))).map(_either_view)
    ds = ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=training)
    if class_weights is not None:
        ds = pipeline.with_sample_weights(ds, class_weights)
    if not training:
        ds = ds.repeat()  # Validation in fit: whole passes, a fixed step count.
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_pipeline(ctx: tf.distribute.InputContext,
                    context: tf.distribute.InputContext) -> None:
    if ctx.input_pipeline_id != context.input_pipeline_id:
        raise RuntimeError(
            f"Feature cache of input pipeline {context.input_pipeline_id} asked for "
            f"pipeline {ctx.input_pipeline_id}.")


def _model_input(arrays):
    """One array for a one-input model, the tuple for a model of several inputs."""
    arrays = tuple(arrays)
    return arrays[0] if len(arrays) == 1 else arrays


def _either_view(element, coin):
    (original, flipped), label = element
    return tf.cond(coin % 2 == 0, lambda: original, lambda: flipped), label
