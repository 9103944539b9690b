"""Where the frozen work lives on storage: content-addressed entries, published whole.

A store is a folder, local or gs:// (through ``tf.io.gfile``): ``--cache_dir``,
which outlasts the job and is shared by reruns and tuning trials, or a
scratch folder on local disk for work that does not fit in memory. One
entry per ``cache_key.CacheKey``; each worker writes and reads its own part,
the same share of the images that its input pipeline reads::

    <store>/<kind>-<view>-<digest>/
        worker-<i>-of-<n>.json                  the part's manifest, written last
        worker-<i>-of-<n>/<writer>/<split>-<k>.tfrecord

A record holds one extraction batch as raw bytes: each output in the
cached dtype (float32, or float16 under mixed precision), then the labels
(int32 class indices, or float32 k-hot rows of a multi-label task: the
manifest's ``labels_shape``, absent in older entries for scalar labels),
so reading back is one copy into a tensor, sliced and reinterpreted. Shards roll over every
``SHARD_BYTES``; two entries of the same shapes and batches (an image's
and its mirror image's frontier) get the same shards, so they can be read
side by side in any shard order.

Publishing: shards go under a folder named by a random writer token, then
the manifest is created at its final name only if none is there, in one
atomic step (``_create_once``: a Cloud Storage upload that must not find an
object; on local disk a hard link of a complete temporary file). The final
manifest is what makes a part exist, and it names only shards that were
complete (with their sizes, checked on every read). So a writer killed
mid-write leaves shards nobody reads; of two writers filling one key at
once, the first to create the manifest wins and the other removes its own
shards and reads the winner's. A killed writer's shards are never read;
the next reader or writer of the same part removes them once nothing was
written to them for a day (trainer/cache_cleanup.py), never a live
writer's or the published ones.
"""

import functools
import json
import os
import posixpath
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import cache_cleanup
from trainer import cache_key

SHARD_BYTES = 128 * 2**20
_READ_BUFFER = 8 * 2**20
_READ_CHUNK = 64 * 2**20  # Record bytes cut apart at once when reading into memory.
Spec = Tuple[Tuple[int, ...], str]  # (shape of one image's output, dtype name)


def part_name(index: int, count: int) -> str:
    """The name of worker ``index``'s part of an entry, of ``count`` workers."""
    return f"worker-{index}-of-{count}"


class Entry:
    """A published part of an entry: its manifest, and reading its records back."""

    def __init__(self, folder: str, manifest: Dict):
        self.folder, self.manifest = folder, manifest
        self.specs: List[Spec] = [(tuple(o["shape"]), o["dtype"]) for o in manifest["outputs"]]
        self.labels_dtype = manifest["labels_dtype"]
        self.labels_shape = tuple(manifest.get("labels_shape", ()))

    def count(self, split: str) -> int:
        return self.manifest["splits"][split]["count"]

    def paths(self, split: str) -> List[str]:
        return [posixpath.join(self.folder, s["file"])
                for s in self.manifest["splits"][split]["shards"]]

    def shard_records(self, split: str) -> List[int]:
        return [s["records"] for s in self.manifest["splits"][split]["shards"]]

    def parse(self, record: tf.Tensor):
        """One record -> (tuple of outputs [batch, ...], labels [batch]).

        One copy (the bytes into a uint8 tensor); each output is then a
        slice of it, reinterpreted in its dtype without copying.
        """
        data = tf.io.decode_raw(record, tf.uint8)
        sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.specs]
        label_size = np.dtype(self.labels_dtype).itemsize * int(np.prod(self.labels_shape))
        batch = tf.size(data) // (sum(sizes) + label_size)
        pieces, start = [], 0
        for (shape, dtype), size in zip(self.specs, sizes):
            pieces.append(_view(data[start * batch:(start + size) * batch], dtype, batch, shape))
            start += size
        labels = _view(data[start * batch:], self.labels_dtype, batch, self.labels_shape)
        return tuple(pieces), labels

    def batches(self, path) -> tf.data.Dataset:
        """The records of one shard file, parsed: (outputs, labels) batches in order."""
        return tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).map(
            self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def arrays(self, split: str) -> Tuple[Tuple[tf.Tensor, ...], np.ndarray]:
        """A split's outputs as tensors, and its labels (for memory).

        The records are read a chunk of about ``_READ_CHUNK`` bytes at a
        time and cut apart with numpy straight into arrays of the split's
        size (no per-batch eager ``tf.data`` steps, no traced parse: a
        tuning trial's read of its pooled entry is a fixed cost before
        phase 1). Each array then becomes a tensor and is dropped, so the
        peak is about twice the outputs, as when joining batches.
        """
        count = self.count(split)
        outputs = [np.empty((count, *shape), dtype) for shape, dtype in self.specs]
        labels = np.empty((count, *self.labels_shape), self.labels_dtype)
        filled = 0
        for path, shard in zip(self.paths(split), self.manifest["splits"][split]["shards"]):
            per_chunk = max(1, _READ_CHUNK * shard["records"] // max(1, shard["bytes"]))
            for chunk in tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).batch(
                    per_chunk):
                for record in chunk.numpy():
                    pieces, batch_labels = self.split_bytes(record)
                    end = filled + len(batch_labels)
                    if end > count:
                        raise RuntimeError(f"Cache entry {self.folder}: more {split} records "
                                           f"than its manifest's {count}.")
                    for output, piece in zip(outputs, pieces):
                        output[filled:end] = piece
                    labels[filled:end] = batch_labels
                    filled = end
        if filled != count:
            raise RuntimeError(f"Cache entry {self.folder}: {filled} {split} records, its "
                               f"manifest says {count}.")
        tensors = []
        while outputs:  # One array at a time: each is freed once it is a tensor.
            tensors.append(tf.convert_to_tensor(outputs.pop(0)))
        return tuple(tensors), labels

    def split_bytes(self, record: bytes) -> Tuple[List[np.ndarray], np.ndarray]:
        """One record's bytes -> (each output [batch, ...], labels [batch, *labels_shape]),
        numpy views: the layout ``parse`` reads in TensorFlow."""
        data = np.frombuffer(record, np.uint8)
        sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.specs]
        label_size = np.dtype(self.labels_dtype).itemsize * int(np.prod(self.labels_shape))
        batch, remainder = divmod(len(data), sum(sizes) + label_size)
        if remainder:
            raise RuntimeError(f"Cache entry {self.folder}: a record of {len(data)} bytes "
                               "is not a whole batch of its outputs.")
        pieces, start = [], 0
        for (shape, dtype), size in zip(self.specs, sizes):
            pieces.append(data[start * batch:(start + size) * batch].view(dtype)
                          .reshape(batch, *shape))
            start += size
        return pieces, data[start * batch:].view(self.labels_dtype).reshape(
            batch, *self.labels_shape)

    def bytes_per_image(self) -> int:
        """Bytes of one image's outputs in this entry (the records add labels and framing)."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.specs)


class Writer:
    """Writes one part of one entry, batch by batch; ``publish`` makes it exist."""

    def __init__(self, store: "Store", key: cache_key.CacheKey, part: str):
        self._store, self._key, self._part = store, key, part
        self.token = uuid.uuid4().hex[:12]
        self._folder = posixpath.join(store.root, key.name)
        self._shard_folder = posixpath.join(self._folder, part, self.token)
        self._splits: Dict[str, Dict] = {}
        self._writers: Dict[str, tf.io.TFRecordWriter] = {}
        self._specs: Optional[List[Spec]] = None
        self._labels_dtype = None
        self._labels_shape = ()
        store.remove_orphans(key, part)
        tf.io.gfile.makedirs(self._shard_folder)

    def add(self, split: str, outputs: Sequence, labels: np.ndarray) -> None:
        """One batch of ``split``: each output [batch, ...] and the labels [batch]."""
        outputs = [np.asarray(o) for o in outputs]
        labels = np.asarray(labels)
        specs = [(tuple(o.shape[1:]), o.dtype.name) for o in outputs]
        if self._specs is None:
            self._specs, self._labels_dtype = specs, labels.dtype.name
            self._labels_shape = tuple(labels.shape[1:])
        elif specs != self._specs:
            raise ValueError(f"Cache entry {self._key.name}: outputs {specs} after {self._specs}.")
        # Batch-major raw bytes: each output in turn, then the labels.
        record = b"".join(np.ascontiguousarray(a).tobytes() for a in [*outputs, labels])
        info = self._splits.setdefault(split, {"count": 0, "shards": [], "per_shard": None})
        if info["per_shard"] is None:
            info["per_shard"] = max(1, SHARD_BYTES // len(record))
        if not info["shards"] or info["shards"][-1]["records"] >= info["per_shard"]:
            self._roll(split, info)
        self._writers[split].write(record)
        shard = info["shards"][-1]
        shard["records"] += 1
        info["count"] += len(labels)

    def _roll(self, split: str, info: Dict) -> None:
        self._close(split)
        name = f"{split}-{len(info['shards']):05d}.tfrecord"
        info["shards"].append({"file": posixpath.join(self._part, self.token, name),
                               "records": 0})
        self._writers[split] = tf.io.TFRecordWriter(posixpath.join(self._shard_folder, name))

    def _close(self, split: str) -> None:
        writer = self._writers.pop(split, None)
        if writer is not None:
            writer.close()

    def publish(self) -> Entry:
        """Closes the shards and publishes the part; returns the entry now published.

        Another writer's part, when it published first: this writer's
        shards are removed and the winner's entry returned.
        """
        for split in list(self._writers):
            self._close(split)
        for info in self._splits.values():
            for shard in info["shards"]:
                shard["bytes"] = tf.io.gfile.stat(posixpath.join(self._folder,
                                                                 shard["file"])).length
        manifest = {"key": self._key.fields(), "writer": self.token, "part": self._part,
                    "outputs": [{"shape": list(s), "dtype": d} for s, d in self._specs or []],
                    "labels_dtype": self._labels_dtype,
                    **({"labels_shape": list(self._labels_shape)} if self._labels_shape else {}),
                    "splits": {name: {"count": info["count"], "shards": info["shards"]}
                               for name, info in self._splits.items()}}
        final = posixpath.join(self._folder, f"{self._part}.json")
        if not _create_once(final, json.dumps(manifest).encode(), self.token):
            self.abort()
            logging.info("Cache entry %s/%s: another writer published first; reading its.",
                         self._key.name, self._part)
            winner = self._store.lookup(self._key, self._part)
            if winner is None:
                raise RuntimeError(f"Cache entry {final} was published by another writer "
                                   "but cannot be read; remove it and run again.")
            return winner
        return Entry(self._folder, manifest)

    def abort(self) -> None:
        """Removes this writer's shards (nothing was published)."""
        for split in list(self._writers):
            self._close(split)
        if tf.io.gfile.exists(self._shard_folder):
            tf.io.gfile.rmtree(self._shard_folder)


class Store:
    """Entries under ``root`` (local or gs://).

    ``orphan_age_s``: a crashed writer's shards untouched this long are
    removed by the next lookup or writer of their part.
    """

    def __init__(self, root: str, orphan_age_s: float = cache_cleanup.ORPHAN_AGE_S):
        self.root = root.rstrip("/")
        self.orphan_age_s = orphan_age_s

    def remove_orphans(self, key: cache_key.CacheKey, part: str) -> int:
        """Removes crashed writers' leftovers of ``key``'s ``part`` (cache_cleanup.py)."""
        folder = posixpath.join(self.root, key.name)
        return self._clean(folder, part, _read_manifest(posixpath.join(folder, f"{part}.json")))

    def _clean(self, folder: str, part: str, manifest) -> int:
        if manifest is _UNREADABLE or (manifest is not None and not isinstance(manifest, dict)):
            return 0  # Which shards are published is unknown: nothing is removed.
        return cache_cleanup.remove_orphans(folder, part, manifest and manifest.get("writer"),
                                            self.orphan_age_s)

    def lookup(self, key: cache_key.CacheKey, part: str) -> Optional[Entry]:
        """The published part of ``key``'s entry, or None.

        None too when what is there does not prove to be that entry whole:
        a manifest of another key (a stale or colliding entry) or one whose
        shards are missing or of another size (logged).
        """
        folder = posixpath.join(self.root, key.name)
        path = posixpath.join(folder, f"{part}.json")
        manifest = _read_manifest(path)
        self._clean(folder, part, manifest)
        if not isinstance(manifest, dict):
            return None
        if _canonical(manifest.get("key")) != _canonical(key.fields()):
            logging.warning("Cache entry %s belongs to another key: computing instead.", path)
            return None
        entry = Entry(folder, manifest)
        for split, info in manifest["splits"].items():
            for shard, file_path in zip(info["shards"], entry.paths(split)):
                if not tf.io.gfile.exists(file_path) or (
                        tf.io.gfile.stat(file_path).length != shard["bytes"]):
                    logging.warning("Cache entry %s: shard %s missing or of another size: "
                                    "computing instead.", path, file_path)
                    return None
        return entry

    def writer(self, key: cache_key.CacheKey, part: str) -> Writer:
        return Writer(self, key, part)


_UNREADABLE = object()


def _read_manifest(path: str):
    """A part's manifest; None when there is none, _UNREADABLE when it cannot be parsed."""
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        logging.warning("Cache entry %s unreadable (%s): computing instead.", path, e)
        return _UNREADABLE


def _create_once(path: str, data: bytes, token: str) -> bool:
    """Writes ``data`` to ``path`` unless a file is there; False if one was.

    Atomic: of two writers, exactly one creates the file, and a reader sees
    it whole or not at all. ``tf.io.gfile`` has no create-if-absent (its
    rename checks, then renames), so this takes each storage's own: a
    Cloud Storage upload with ``ifGenerationMatch=0`` (google-cloud-storage),
    and on local disk a hard link of a complete temporary file, which
    fails when the name exists.
    """
    if path.startswith("gs://"):
        from google.api_core import exceptions

        bucket, name = path[len("gs://"):].split("/", 1)
        try:
            _storage_client().bucket(bucket).blob(name).upload_from_string(
                data, content_type="application/json", if_generation_match=0)
        except exceptions.PreconditionFailed:
            return False
        return True
    temporary = f"{path}.tmp-{token}"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.remove(temporary)
    return True


@functools.lru_cache(maxsize=None)
def _storage_client():
    from google.cloud import storage

    return storage.Client()


def _view(data: tf.Tensor, dtype: str, batch: tf.Tensor, shape) -> tf.Tensor:
    """uint8 bytes -> [batch, *shape] of ``dtype``, reinterpreted (no copy)."""
    itemsize = np.dtype(dtype).itemsize
    if itemsize > 1:
        data = tf.bitcast(tf.reshape(data, [-1, itemsize]), tf.as_dtype(dtype))
    else:
        data = tf.bitcast(data, tf.as_dtype(dtype))
    return tf.reshape(data, [batch, *shape])


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)
