"""The frozen work of one job: what is computed, held in memory, spilled or reused.

``FrozenWork`` gives each phase its model and datasets over the cached
frozen outputs (trainer/features.py computes them):

* Memory: a cache that fits ``--fine_tune_cache_max_gb`` per worker is held
  as tensors, as before.
* Spill: a larger one is written to files while the frozen layers run (one
  batch in memory at a time) and streamed back every epoch through
  ``tf.data`` (trainer/frozen_data.py): no cliff, phase 2 keeps its cache.
  The files go to ``--cache_dir``, or else to a scratch folder on local
  disk that is removed with the job (or, if the job was killed, by the
  next job on that host: trainer/cache_cleanup.py).
* Reuse: with ``--cache_dir`` (local or gs://) every output is a
  content-addressed entry (trainer/cache_key.py, trainer/cache_store.py). A
  job whose key matches reads the entry instead of computing it: phase 1 of
  a tuning trial that differs only in learning rate, dropout or
  ``fine_tune_at`` starts without a frozen pass (pooled features do not
  depend on ``fine_tune_at``; the phase-2 frontier does).
"""

import functools
import shutil
import time
import uuid
import weakref
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import cache_cleanup
from trainer import cache_key
from trainer import cache_store
from trainer import cluster
from trainer import folding
from trainer import frozen_data
from trainer import model as model_lib
from trainer.data import pipeline
from trainer.features import (Cached, Cut, FileSink, MemorySink, Route, cut_at_frontier,
                              frontier, head_model, input_context, pooled_model, run_pass)


POOLED, FRONTIER = cache_key.KINDS
ORIGINAL, FLIPPED = cache_key.VIEWS
# A streamed train pass shuffles in a buffer of this share of the memory
# limit (at least _MIN_SHUFFLE elements): memory stays flat in the images.
_SHUFFLE_SHARE = 0.25
_MIN_SHUFFLE = 256


class FrozenWork:
    """This worker's frozen-backbone work, computed once, for the phases that use it.

    What fits ``max_bytes`` is held in memory; past it, the work is written
    to files as it is computed and streamed back every epoch (no fallback to
    images). With ``cache_dir`` every output is also a content-addressed
    entry there (trainer/cache_store.py, keyed by trainer/cache_key.py): a
    job with the same key reads it instead of computing it.

    Args:
      model: the full classifier.
      splits: the train and validation splits.
      strategy: the distribution strategy ``model`` was built under.
      info: this worker's place in the cluster.
      global_batch: images per step, all replicas together.
      seed: shuffle seed of the cached train data.
      fine_tune_at: the first backbone layer that phase 2 trains.
      fine_tune_cache: cache the frontier for phase 2.
      flip: also cache the frontier of horizontally flipped train images, so
        that phase 2 keeps the recipe's random flip (its random rotation is
        lost).
      max_bytes: the most this worker holds in memory per phase's cache.
      class_weights: a weight per class for the train data (sample weights),
        or None.
      cache_dir: a store (local or gs://) shared across jobs, or "".
      spill_dir: the local folder under which work past ``max_bytes`` is
        spilled without a ``cache_dir`` ("": the system's temporary folder).
      backbone: the backbone's registry name (part of the key).
    """

    def __init__(self, model: keras.Model, splits: Sequence[pipeline.Split],
                 strategy: tf.distribute.Strategy, info: cluster.ClusterInfo,
                 global_batch: int, seed: int, fine_tune_at: int, fine_tune_cache: bool,
                 flip: bool, max_bytes: float,
                 class_weights: Optional[Sequence[float]] = None,
                 cache_dir: str = "", spill_dir: str = "", backbone: str = ""):
        self._model, self._splits, self._strategy = model, list(splits), strategy
        self._class_weights = class_weights
        self._global_batch, self._seed, self._flip = global_batch, seed, flip
        self._fine_tune_at, self._spill_dir = fine_tune_at, spill_dir
        self._backbone = backbone or model_lib.get_backbone(model).name
        self._context = input_context(info, strategy)
        self._part = cache_store.part_name(self._context.input_pipeline_id,
                                           self._context.num_input_pipelines)
        self._image_size = model.input_shape[1]
        self._store = cache_store.Store(cache_dir) if cache_dir else None
        self._memory: Dict[Tuple[str, str], MemorySink] = {}
        self._entries: Dict[Tuple[str, str], cache_store.Entry] = {}
        self._pending: Dict[Tuple[str, str], cache_store.Writer] = {}
        # "<kind>/<view>" -> "computed" or "read": how this job got each output.
        self.sources: Dict[str, str] = {}
        shares = [-(-s.count // self._context.num_input_pipelines) for s in self._splits]
        pooled = model.get_layer(model_lib.POOL_LAYER).output
        self._pooled = _Holding(_bytes_per_image([pooled]), sum(shares), max_bytes)
        self.fine_tune = fine_tune_cache and fine_tune_at > 0
        if self.fine_tune:
            per_image = _bytes_per_image(frontier(model_lib.get_backbone(model), fine_tune_at))
            count = sum(shares) + (shares[0] if flip else 0)
            self._frontier = _Holding(per_image, count, max_bytes, 2 if flip else 1)
            logging.info("Fine-tune cache: %.2f GB for %d images%s (memory limit %.2f GB): %s.",
                         per_image * count / 1e9, count,
                         " and flipped train images" if flip else "", max_bytes / 1e9,
                         "in memory" if self._frontier.in_memory else
                         f"spilled to {cache_dir or 'local disk'} and streamed, "
                         f"shuffle buffer {self._frontier.shuffle_buffer}")

    @property
    def bytes_per_image(self) -> Dict[str, int]:
        """Bytes one image's cached outputs take, per kind (flipped views: as much again)."""
        sizes = {POOLED: self._pooled.per_image}
        if self.fine_tune:
            sizes[FRONTIER] = self._frontier.per_image
        return sizes

    @property
    def frontier_in_memory(self) -> bool:
        """Whether phase 2's cache is held in memory (else spilled to files and streamed)."""
        return self.fine_tune and self._frontier.in_memory

    @functools.cached_property
    def _frozen_base(self) -> keras.Model:
        """The backbone with BatchNorm folded, for the frozen layers' single pass.

        Its weights are a copy made now; the layers it runs for the caches
        never train (phase 1 trains none, phase 2 none below fine_tune_at).
        Plain variables of this worker, outside the strategy: the pass runs
        locally on each worker.
        """
        return folding.fold_batch_norm(model_lib.get_backbone(self._model))

    @functools.cached_property
    def _cut(self) -> Cut:
        frozen_base = self._frozen_base  # Made outside the strategy's scope.
        with self._strategy.scope():
            return cut_at_frontier(self._model, self._fine_tune_at, frozen_base)

    # ------------------------------------------------------------ Keys, store

    @functools.cached_property
    def _key_inputs(self) -> Tuple[str, Dict[str, str]]:
        """(weights digest, {split: listing digest}): hashed once, for a cache_dir only."""
        if self._store is None:
            token = uuid.uuid4().hex  # Scratch entries live and die with this job.
            return token, {s.name: token for s in self._splits}
        start = time.perf_counter()
        inputs = (cache_key.weights_digest(model_lib.get_backbone(self._model)),
                  cache_key.data_digests(self._splits))
        logging.info("Cache keys: weights and %d images hashed in %.1f s.",
                     sum(s.count for s in self._splits), time.perf_counter() - start)
        return inputs

    def key(self, kind: str, view: str) -> cache_key.CacheKey:
        """The key of this job's ``kind``/``view`` entry (flipped views: train only)."""
        weights, data = self._key_inputs
        names = [s.name for s in self._splits[:1 if view == FLIPPED else None]]
        return cache_key.make_key(kind, view, self._backbone, weights, self._image_size,
                                  self._fine_tune_at, {n: data[n] for n in names})

    @functools.cached_property
    def _scratch(self) -> cache_store.Store:
        folder = cache_cleanup.scratch_folder(self._spill_dir)
        weakref.finalize(self, shutil.rmtree, folder, True)
        return cache_store.Store(folder)

    def _have(self, kind: str, view: str) -> bool:
        """Whether the work is held, or found in the cache_dir (then read, not computed)."""
        if (kind, view) in self._memory or (kind, view) in self._entries:
            return True
        if self._store is None:
            return False
        entry = self._store.lookup(self.key(kind, view), self._part)
        if entry is not None:
            logging.info("Frozen work %s/%s: read from %s (same key), not computed.",
                         kind, view, entry.folder)
            self._entries[(kind, view)] = entry
            self.sources[f"{kind}/{view}"] = "read"
        return entry is not None

    def _sinks(self, kind: str, view: str, holding: "_Holding") -> list:
        """Where a pass puts ``kind``/``view``: memory, files, or both."""
        self.sources[f"{kind}/{view}"] = "computed"
        sinks = []
        if holding.in_memory:
            sinks.append(self._memory.setdefault((kind, view), MemorySink()))
        if self._store is not None or not holding.in_memory:
            writer = (self._store or self._scratch).writer(self.key(kind, view), self._part)
            self._pending[(kind, view)] = writer
            sinks.append(FileSink(writer))
        return sinks

    def _run(self, forward, splits, routes: Sequence[Route]) -> None:
        """A pass over ``splits``; then every file written is published whole."""
        try:
            run_pass(forward, splits, self._image_size, self._context, routes)
        except BaseException:
            for writer in self._pending.values():
                writer.abort()
            self._pending.clear()
            raise
        for kind_view, writer in self._pending.items():
            self._entries[kind_view] = writer.publish()
        self._pending.clear()

    # ---------------------------------------------------------------- Phases

    def phase_one(self):
        """(head model, train data, validation data) over pooled features."""
        if not self._have(POOLED, ORIGINAL):
            pooled_sinks = self._sinks(POOLED, ORIGINAL, self._pooled)
            if self.fine_tune and not self._have(FRONTIER, ORIGINAL):
                cut, n = self._cut, len(self._cut.prefix.outputs)

                def forward(images):
                    frontier_ = tf.nest.flatten(cut.prefix(images, training=False))
                    return frontier_ + [cut.pooled(frontier_, training=False)]

                self._run(forward, self._splits, [
                    (0, n, self._sinks(FRONTIER, ORIGINAL, self._frontier)),
                    (n, n + 1, pooled_sinks)])
            else:
                pooled = pooled_model(self._model, self._frozen_base)
                self._run(lambda images: pooled(images, training=False), self._splits,
                          [(0, 1, pooled_sinks)])
        with self._strategy.scope():
            head = head_model(self._model)
        return (head, *self._datasets(POOLED, False, self._pooled))

    def phase_two(self):
        """(rest model, train data, validation data) over frontier activations."""
        cut = self._cut
        if not self._have(FRONTIER, ORIGINAL):
            self._run(lambda images: cut.prefix(images, training=False), self._splits,
                      [(0, None, self._sinks(FRONTIER, ORIGINAL, self._frontier))])
        if self._flip and not self._have(FRONTIER, FLIPPED):
            self._run(lambda images: cut.prefix(tf.reverse(images, axis=[2]), training=False),
                      self._splits[:1],
                      [(0, None, self._sinks(FRONTIER, FLIPPED, self._frontier))])
        return (cut.rest, *self._datasets(FRONTIER, self._flip, self._frontier))

    def _datasets(self, kind: str, flip: bool, holding: "_Holding"):
        """[train, validation] distributed datasets of ``kind`` (with flip views)."""
        views = [(kind, ORIGINAL)] + ([(kind, FLIPPED)] if flip else [])
        if not holding.in_memory:
            entries = [self._entries[v] for v in views]
            return [frozen_data.distribute_entries(
                        self._strategy, entries, "train", self._global_batch, True, self._seed,
                        self._context, holding.shuffle_buffer, self._class_weights),
                    frozen_data.distribute_entries(
                        self._strategy, entries[:1], "validation", self._global_batch, False,
                        self._seed, self._context, holding.shuffle_buffer)]
        train = [self._arrays(v, "train") for v in views]
        validation = self._arrays(views[0], "validation")
        for view in views:  # The joined copies replace the batches.
            self._memory.pop(view, None)
        if flip and not np.array_equal(train[0][1], train[1][1]):
            raise RuntimeError("The flipped train images came in another order.")
        return [frozen_data.distribute(self._strategy, train[0], self._global_batch, True,
                                       self._seed, self._context,
                                       train[1][0] if flip else None, self._class_weights),
                frozen_data.distribute(self._strategy, validation, self._global_batch, False,
                                       self._seed, self._context)]

    def _arrays(self, view: Tuple[str, str], split: str) -> Cached:
        if view in self._memory:
            return self._memory[view].joined(split)
        return self._entries[view].arrays(split)


class _Holding:
    """Whether a cache of ``count`` images fits ``max_bytes``, and the streamed shuffle."""

    def __init__(self, per_image: int, count: int, max_bytes: float, views: int = 1):
        self.per_image = per_image
        self.in_memory = per_image * count <= max_bytes
        self.shuffle_buffer = max(_MIN_SHUFFLE, int(_SHUFFLE_SHARE * max_bytes
                                                    // (per_image * views)))


def _bytes_per_image(tensors) -> int:
    return sum(int(np.prod(t.shape[1:])) * tf.as_dtype(t.dtype).size for t in tensors)
