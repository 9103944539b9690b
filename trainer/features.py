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
and validation images. This module owns the models of the cut and the pass;
trainer/frozen_work.py decides what is computed, held in memory, spilled
or read from the cache store (trainer/cache_store.py).

The price: the cached images are not augmented. Phase 1 sees no
augmentation; phase 2 keeps the recipe's random flip (with ``--augment``, the
frontier of each flipped train image is cached too, and each step takes
either view) but loses its random rotation. Measured on the tutorial's
cats-vs-dogs data in benchmarks/recipe.py.
"""

import functools
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import cache_store
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


class MemorySink:
    """Keeps a pass's outputs in memory, batch by batch, per split."""

    def __init__(self):
        self.pieces: Dict[str, Tuple[List[List[tf.Tensor]], List[np.ndarray]]] = {}

    def add(self, split: str, outputs: Sequence[tf.Tensor], labels: np.ndarray) -> None:
        parts, split_labels = self.pieces.setdefault(split, ([[] for _ in outputs], []))
        for part, output in zip(parts, outputs):
            part.append(output)
        split_labels.append(labels)

    def split_pieces(self, split: str) -> Pieces:
        parts, labels = self.pieces[split]
        return tuple(parts), np.concatenate(labels)

    def joined(self, split: str) -> Cached:
        return joined(self.split_pieces(split))


class FileSink:
    """Hands a pass's outputs to a cache_store.Writer (as numpy arrays)."""

    def __init__(self, writer: cache_store.Writer):
        self.writer = writer

    def add(self, split: str, outputs: Sequence[tf.Tensor], labels: np.ndarray) -> None:
        self.writer.add(split, [o.numpy() for o in outputs], labels)


Route = Tuple[int, int, Sequence]  # outputs [start, stop) of a pass -> these sinks


def run_pass(forward: Callable[[tf.Tensor], object], splits: Sequence[pipeline.Split],
             image_size: int, context: tf.distribute.InputContext,
             routes: Sequence[Route]) -> None:
    """Runs ``forward`` once over this worker's share of ``splits``, batch by batch.

    ``forward`` maps a uint8 image batch to a tensor or a list of tensors;
    each route hands a slice of that list, with the labels, to its sinks as
    the batches come (so a pass to files holds one batch in memory). It runs
    locally on each worker (no collective ops): reading a mirrored variable
    outside a replica context reads this worker's copy. The splits stream
    through one traced function in one pass, so reading the next split
    overlaps the end of the last.
    """
    traced = tf.function(forward, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    tagged = [pipeline.make_dataset(split, image_size, _EXTRACT_BATCH, training=False,
                                    input_context=context, cache="none").map(
                  functools.partial(_tag, index=index))
              for index, split in enumerate(splits)]
    images = functools.reduce(tf.data.Dataset.concatenate, tagged)
    start, count = time.perf_counter(), 0
    for batch, batch_labels, index in images:
        outputs = tf.nest.flatten(traced(batch))
        labels, name = batch_labels.numpy(), splits[int(index)].name
        for first, stop, sinks in routes:
            for sink in sinks:
                sink.add(name, outputs[first:stop], labels)
        count += len(labels)
    seconds = time.perf_counter() - start
    logging.info("Ran the frozen layers over %d images of %s in %.1f s (%.0f images/s).",
                 count, "+".join(s.name for s in splits), seconds, count / max(seconds, 1e-9))


def extract(forward: Callable[[tf.Tensor], object], splits: Sequence[pipeline.Split],
            image_size: int, context: tf.distribute.InputContext) -> List[Cached]:
    """``forward``'s outputs and the labels of this worker's share of each split."""
    return [joined(pieces) for pieces in extract_pieces(forward, splits, image_size, context)]


def extract_pieces(forward: Callable[[tf.Tensor], object], splits: Sequence[pipeline.Split],
                   image_size: int, context: tf.distribute.InputContext) -> List[Pieces]:
    """Like ``extract``, with each output left as its list of batches (see ``joined``)."""
    sink = MemorySink()
    run_pass(forward, splits, image_size, context, [(0, None, [sink])])
    return [sink.split_pieces(split.name) for split in splits]


def joined(pieces: Pieces) -> Cached:
    """Each output's batches as one tensor: one copy, made when it is needed.

    Large outputs (the frontier) are joined only when phase 2 starts, so
    phase 1 does not wait for a copy it never reads.
    """
    parts, labels = pieces
    return tuple(tf.concat(batches, axis=0) for batches in parts), labels


def _tag(images, labels, index):
    return images, labels, index
