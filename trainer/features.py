"""Caches of the frozen backbone's work, computed once per image.

The backbone runs in inference mode in both phases, so whatever its frozen
layers compute for an image never changes:

* Phase 1 (``--feature_cache``): the whole backbone is frozen, so its pooled
  features are fixed. Phase 1 trains the head (dropout + logits, the very
  layers of the full model) on cached feature vectors.
* Phase 2 (``--fine_tune_cache``): layers below ``fine_tune_at`` stay
  frozen, so the activations that the unfrozen layers read from them -- the
  *frontier*, e.g. two 10x10 maps of MobileNetV2 at 160 px -- are fixed.
  Phase 2 trains ``Cut.rest``, the unfrozen layers and the head (again the
  full model's own layers), on cached frontier activations, skipping the
  frozen layers' forward pass (about 3/4 of MobileNetV2's) on every step.

When both are on, the frozen layers run once per image for both phases: the
pooled features come from the cached frontier. That pass runs a copy of the
backbone with its BatchNorm folded into the convolutions (trainer/folding.py),
which computes the same, faster. Each worker caches its own share of the train
and validation images.

The price: the cached images are not augmented. Phase 1 sees no
augmentation; phase 2 keeps the recipe's random flip (with ``--augment``, the
frontier of each flipped train image is cached too, and each step takes
either view) but loses its random rotation. Measured on the tutorial's
cats-vs-dogs data in benchmarks/recipe.py.
"""

import functools
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import cluster
from trainer import folding
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


def frontier(base: keras.Model, fine_tune_at: int) -> List[tf.Tensor]:
    """Tensors of ``base`` made by layers below ``fine_tune_at`` and read by layers from it on."""
    frozen = {id(layer) for layer in base.layers[:fine_tune_at]}
    found = []
    for layer in base.layers[fine_tune_at:]:
        for node in layer.inbound_nodes:
            for tensor in tf.nest.flatten(node.input_tensors):
                if (id(tensor._keras_history.layer) in frozen
                        and not any(tensor is f for f in found)):
                    found.append(tensor)
    return found


class Cut(NamedTuple):
    """The classifier split at the backbone's frozen frontier; all share ``model``'s layers."""

    prefix: keras.Model  # images (as the full model takes them) -> frontier activations
    rest: keras.Model  # frontier activations -> logits
    pooled: keras.Model  # frontier activations -> pooled features (rest without the head)


def cut_at_frontier(model: keras.Model, fine_tune_at: int,
                    frozen_base: Optional[keras.Model] = None) -> Cut:
    """Splits the classifier where the backbone's layers from ``fine_tune_at`` on begin.

    ``rest`` runs the backbone's layers from ``fine_tune_at`` on (in inference
    mode, as in the full model), pooling, dropout and the logit layer: the
    model's own layers, trained in phase 2. ``prefix`` and ``pooled`` are for
    inference only; they run ``frozen_base``, a copy of the backbone that
    computes the same (``folding.fold_batch_norm``'s), or else the backbone
    itself. Build the cut in the strategy's scope of ``model``.
    """
    base = model_lib.get_backbone(model)
    frozen = frozen_base or base
    frozen_cut = frontier(frozen, fine_tune_at)
    inputs = keras.Input(model.input_shape[1:], name="image")
    prefix = keras.Model(inputs, keras.Model(frozen.input, frozen_cut)(
        _rescaled(model, inputs), training=False), name="prefix")

    rest_inputs = [keras.Input(t.shape[1:], name=f"frontier_{i}") for i, t in enumerate(frozen_cut)]
    pool = model.get_layer(model_lib.POOL_LAYER)
    x = pool(keras.Model(frontier(base, fine_tune_at), base.output)(rest_inputs, training=False))
    x = model.get_layer(model_lib.DROPOUT_LAYER)(x)
    rest = keras.Model(rest_inputs, model.get_layer(model_lib.LOGITS_LAYER)(x), name="rest")
    pooled = pool(keras.Model(frozen_cut, frozen.output)(rest_inputs, training=False))
    return Cut(prefix, rest, keras.Model(rest_inputs, pooled, name="pooled_from_frontier"))


def _rescaled(model: keras.Model, images):
    """``images`` through the model's rescaling layer, if it has one."""
    if model_lib.RESCALE_LAYER in [layer.name for layer in model.layers]:
        return model.get_layer(model_lib.RESCALE_LAYER)(images)
    return images


def frontier_bytes(prefix: keras.Model, count: int) -> int:
    """Memory that ``count`` images' cached frontier activations take (float16 under
    mixed precision, else float32)."""
    return count * sum(int(np.prod(t.shape[1:])) * tf.as_dtype(t.dtype).size
                       for t in prefix.outputs)


def pooled_model(model: keras.Model, frozen_base: Optional[keras.Model] = None) -> keras.Model:
    """images -> the backbone's pooled features, in inference mode.

    ``frozen_base``: a copy of the backbone that computes the same, run
    instead of it (see ``cut_at_frontier``).
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    x = (frozen_base or model_lib.get_backbone(model))(_rescaled(model, inputs), training=False)
    return keras.Model(inputs, model.get_layer(model_lib.POOL_LAYER)(x), name="pooled")


Cached = Tuple[Tuple[tf.Tensor, ...], np.ndarray]  # (outputs, labels) of one split
Pieces = Tuple[Tuple[List[tf.Tensor], ...], np.ndarray]  # the same, batch by batch


def extract(forward: Callable[[tf.Tensor], object], splits: Sequence[pipeline.Split],
            image_size: int, context: tf.distribute.InputContext) -> List[Cached]:
    """``forward``'s outputs and the labels of this worker's share of each split."""
    return [joined(pieces) for pieces in extract_pieces(forward, splits, image_size, context)]


def extract_pieces(forward: Callable[[tf.Tensor], object], splits: Sequence[pipeline.Split],
                   image_size: int, context: tf.distribute.InputContext) -> List[Pieces]:
    """Like ``extract``, with each output left as its list of batches (see ``joined``).

    ``forward`` maps a uint8 image batch to a tensor or a list of tensors. It
    runs locally on each worker (no collective ops): reading a mirrored
    variable outside a replica context reads this worker's copy. The splits
    stream through one traced function in one pass, so reading the next split
    overlaps the end of the last.
    """
    traced = tf.function(forward, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    tagged = [pipeline.make_dataset(split, image_size, _EXTRACT_BATCH, training=False,
                                    input_context=context, cache="none").map(
                  functools.partial(_tag, index=index))
              for index, split in enumerate(splits)]
    images = functools.reduce(tf.data.Dataset.concatenate, tagged)
    start = time.perf_counter()
    outputs, labels = [[] for _ in splits], [[] for _ in splits]
    for batch, batch_labels, index in images:
        outputs[int(index)].append(tf.nest.flatten(traced(batch)))
        labels[int(index)].append(batch_labels.numpy())
    seconds = time.perf_counter() - start
    count = sum(len(y) for split_labels in labels for y in split_labels)
    logging.info("Cached the frozen backbone's work for %d images of %s in %.1f s "
                 "(%.0f images/s).", count, "+".join(s.name for s in splits), seconds,
                 count / max(seconds, 1e-9))
    return [(tuple(map(list, zip(*split_outputs))), np.concatenate(split_labels))
            for split_outputs, split_labels in zip(outputs, labels)]


def joined(pieces: Pieces) -> Cached:
    """Each output's batches as one tensor: one copy, made when it is needed.

    Large outputs (the frontier) are joined only when phase 2 starts, so
    phase 1 does not wait for a copy it never reads.
    """
    parts, labels = pieces
    return tuple(tf.concat(batches, axis=0) for batches in parts), labels


def _tag(images, labels, index):
    return images, labels, index


def distribute(strategy: tf.distribute.Strategy, cached: Cached,
               global_batch: int, training: bool, seed: int,
               context: tf.distribute.InputContext,
               flipped: Optional[Tuple[tf.Tensor, ...]] = None,
               class_weights: Optional[Sequence[float]] = None
               ) -> tf.distribute.DistributedDataset:
    """A distributed dataset over this worker's cached arrays.

    With ``flipped`` (the same arrays of the horizontally flipped images),
    each element takes either view with probability 1/2: the recipe's random
    flip, exactly. With ``class_weights``, batches carry each example's
    class weight as a third element, as the image pipeline's do.
    """
    arrays, labels = cached

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        if ctx.input_pipeline_id != context.input_pipeline_id:
            raise RuntimeError(
                f"Feature cache of input pipeline {context.input_pipeline_id} asked for "
                f"pipeline {ctx.input_pipeline_id}.")
        if flipped is None:
            ds = tf.data.Dataset.from_tensor_slices((_model_input(arrays), labels))
        else:
            views = (_model_input(arrays), _model_input(flipped))
            ds = tf.data.Dataset.from_tensor_slices((views, labels))
        if training:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat()
        if flipped is not None:
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed))).map(_either_view)
        ds = ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=training)
        if class_weights is not None:
            ds = pipeline.with_sample_weights(ds, class_weights)
        if not training:
            ds = ds.repeat()  # Validation in fit: whole passes, a fixed step count.
        return ds.prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _model_input(arrays: Tuple[tf.Tensor, ...]):
    """One array for a one-input model, the tuple for a model of several inputs."""
    return arrays[0] if len(arrays) == 1 else arrays


def _either_view(element, coin):
    (original, flipped), label = element
    return tf.cond(coin % 2 == 0, lambda: original, lambda: flipped), label


class FrozenWork:
    """This worker's cached frozen-backbone work, computed once, for the phases that use it.

    Args:
      model: the full classifier.
      splits: the train and validation splits.
      strategy: the distribution strategy ``model`` was built under.
      info: this worker's place in the cluster.
      global_batch: images per step, all replicas together.
      seed: shuffle seed of the cached train data.
      fine_tune_at: the first backbone layer that phase 2 trains.
      fine_tune_cache: cache the frontier for phase 2, if it fits ``max_bytes``.
      flip: also cache the frontier of horizontally flipped train images, so
        that phase 2 keeps the recipe's random flip (its random rotation is
        lost).
      max_bytes: largest frontier cache of this worker.
      class_weights: a weight per class for the train data (sample weights),
        or None.
    """

    def __init__(self, model: keras.Model, splits: Sequence[pipeline.Split],
                 strategy: tf.distribute.Strategy, info: cluster.ClusterInfo,
                 global_batch: int, seed: int, fine_tune_at: int, fine_tune_cache: bool,
                 flip: bool, max_bytes: float,
                 class_weights: Optional[Sequence[float]] = None):
        self._model, self._splits, self._strategy = model, list(splits), strategy
        self._class_weights = class_weights
        self._global_batch, self._seed, self._flip = global_batch, seed, flip
        self._context = input_context(info, strategy)
        self._image_size = model.input_shape[1]
        self._frontier: Optional[List[Pieces]] = None
        self._flipped: Optional[Pieces] = None
        self.fine_tune = False
        if fine_tune_cache and fine_tune_at > 0:
            frozen_base = self._frozen_base  # Made outside the strategy's scope.
            with strategy.scope():
                self._cut = cut_at_frontier(model, fine_tune_at, frozen_base)
            shares = [-(-s.count // self._context.num_input_pipelines) for s in self._splits]
            count = sum(shares) + (shares[0] if flip else 0)
            size = frontier_bytes(self._cut.prefix, count)
            self.fine_tune = size <= max_bytes
            logging.info("Fine-tune cache: %.2f GB for %d images%s (limit %.2f GB): %s.",
                         size / 1e9, count, " and flipped train images" if flip else "",
                         max_bytes / 1e9, "on" if self.fine_tune else "off, phase 2 reads images")

    @functools.cached_property
    def _frozen_base(self) -> keras.Model:
        """The backbone with BatchNorm folded, for the frozen layers' single pass.

        Its weights are a copy made now; the layers it runs for the caches
        never train (phase 1 trains none, phase 2 none below fine_tune_at).
        Plain variables of this worker, outside the strategy: the pass runs
        locally on each worker.
        """
        return folding.fold_batch_norm(model_lib.get_backbone(self._model))

    def _distribute(self, cached: List[Cached], flipped=None):
        train, validation = cached
        return [distribute(self._strategy, train, self._global_batch, True, self._seed,
                           self._context, flipped, self._class_weights),
                distribute(self._strategy, validation, self._global_batch, False, self._seed,
                           self._context)]

    def _extract_frontier(self, with_pooled: bool) -> List[Cached]:
        """Keeps each split's frontier; returns each split's pooled features from the
        same pass when ``with_pooled``, else nothing."""
        cut = self._cut

        def forward(images):
            frontier = tf.nest.flatten(cut.prefix(images, training=False))
            return frontier + ([cut.pooled(frontier, training=False)] if with_pooled else [])

        pieces = extract_pieces(forward, self._splits, self._image_size, self._context)
        n = len(cut.prefix.outputs)
        self._frontier = [(parts[:n], labels) for parts, labels in pieces]
        return [joined((parts[n:], labels)) for parts, labels in pieces] if with_pooled else []

    def _extract_flipped(self) -> None:
        """Keeps the frontier of the horizontally flipped train images (phase 2 only)."""
        [self._flipped] = extract_pieces(
            lambda images: self._cut.prefix(tf.reverse(images, axis=[2]), training=False),
            self._splits[:1], self._image_size, self._context)
        if not np.array_equal(self._flipped[1], self._frontier[0][1]):
            raise RuntimeError("The flipped train images came in another order.")

    def phase_one(self):
        """(head model, train data, validation data) over pooled features."""
        if self.fine_tune:
            cached = self._extract_frontier(with_pooled=True)
        else:
            pooled = pooled_model(self._model, self._frozen_base)
            cached = extract(lambda images: pooled(images, training=False), self._splits,
                             self._image_size, self._context)
        with self._strategy.scope():
            head = head_model(self._model)
        return (head, *self._distribute(cached))

    def phase_two(self):
        """(rest model, train data, validation data) over frontier activations."""
        if self._frontier is None:
            self._extract_frontier(with_pooled=False)
        if self._flip and self._flipped is None:
            self._extract_flipped()
        frontier = [joined(pieces) for pieces in self._frontier]
        flipped = joined(self._flipped)[0] if self._flipped else None
        self._frontier = self._flipped = None  # The joined copies replace the batches.
        return (self._cut.rest, *self._distribute(frontier, flipped))
