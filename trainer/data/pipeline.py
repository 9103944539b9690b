"""Input pipelines: a data folder -> tf.data datasets for train and eval.

Two sources share one pipeline:

* an image folder with ``train/``, ``validation/`` and optionally ``test/``,
  each of class-named subfolders (small local runs, the demo);
* prepared TFRecords with a ``manifest.json`` (``trainer.prepare``), the
  format for large data and Cloud Storage.

The order, as one function reads it: list files -> shard per input pipeline
(one per worker) -> read and decode in parallel -> resize -> cache (decoded,
resized uint8 images) -> shuffle + repeat (train only) -> batch -> prefetch.
Paths go through ``tf.io.gfile``, so local and gs:// folders take the same
code.
"""

import dataclasses
import random
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf

from trainer.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: image files with labels, or TFRecord shards with a count."""

    name: str
    count: int
    paths: Tuple[str, ...] = ()
    labels: Tuple[int, ...] = ()
    shards: Tuple[str, ...] = ()

    @property
    def is_records(self) -> bool:
        return bool(self.shards)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Class names (index order) and the splits of a data folder."""

    class_names: Tuple[str, ...]
    splits: Dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class DataError(ValueError):
    """The data folder cannot be trained on; the message says why and where."""


def describe(data_dir: str, test_fraction: float = 0.2, seed: int = 42) -> DatasetInfo:
    """Lists a data folder: class names and the files of each split.

    Without a test split, ``test_fraction`` of each validation class is held
    out as test, chosen by ``seed`` (the tutorial holds out a fifth of its
    validation batches).
    """
    root = data_dir.rstrip("/")
    if tf.io.gfile.exists(f"{root}/{records.MANIFEST}"):
        return _describe_records(root)
    class_names = tuple(sorted(
        name.rstrip("/") for name in tf.io.gfile.listdir(f"{root}/train")
        if tf.io.gfile.isdir(f"{root}/train/{name.rstrip('/')}")))
    if len(class_names) < 2:
        raise DataError(f"{root}/train needs at least 2 class subfolders, found {list(class_names)}.")
    splits = {name: _list_images(root, name, class_names)
              for name in SPLITS if tf.io.gfile.isdir(f"{root}/{name}")}
    for name in ("train", "validation"):
        for label, class_name in enumerate(class_names):
            if label not in splits[name].labels:
                raise DataError(f"{root}/{name}/{class_name} holds no images.")
    if "test" not in splits:
        splits["validation"], splits["test"] = _hold_out(splits["validation"], test_fraction, seed)
    return DatasetInfo(class_names, splits)


def _list_images(root: str, split: str, class_names: Sequence[str]) -> Split:
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        folder = f"{root}/{split}/{class_name}"
        if not tf.io.gfile.isdir(folder):
            continue
        for name in sorted(tf.io.gfile.listdir(folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(f"{folder}/{name}")
                labels.append(label)
    return Split(split, len(paths), tuple(paths), tuple(labels))


def _hold_out(split: Split, fraction: float, seed: int) -> Tuple[Split, Split]:
    """Splits off a deterministic, per-class fraction of a split."""
    rng = random.Random(seed)
    keep, hold = [], []
    for label in sorted(set(split.labels)):
        members = [i for i, y in enumerate(split.labels) if y == label]
        rng.shuffle(members)
        n_hold = int(round(len(members) * fraction))
        hold += members[:n_hold]
        keep += members[n_hold:]

    def subset(name, indices):
        indices = sorted(indices)
        return Split(name, len(indices), tuple(split.paths[i] for i in indices),
                     tuple(split.labels[i] for i in indices))

    return subset(split.name, keep), subset("test", hold)


def _describe_records(root: str) -> DatasetInfo:
    manifest = records.read_manifest(root)
    splits = {
        name: Split(name, info["count"],
                    shards=tuple(f"{root}/{shard}" for shard in info["shards"]))
        for name, info in manifest["splits"].items() if info["count"]}
    return DatasetInfo(tuple(manifest["class_names"]), splits)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 [size, size, 3] in [0, 255].

    The same function serves the exported model, so training and serving see
    identically decoded and resized pixels.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size])


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    # Cached as uint8: a quarter of float32's memory.
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _read_examples(split: Split, image_size: int,
                   input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """(uint8 image, label) pairs of this input pipeline's share of a split."""
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    index = input_context.input_pipeline_id if input_context else 0
    if split.is_records:
        files = tf.data.Dataset.from_tensor_slices(list(split.shards))
        files = files.shard(num_pipelines, index)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(records.parse_example, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = tf.data.Dataset.from_tensor_slices((list(split.paths), list(split.labels)))
        ds = ds.shard(num_pipelines, index)
        ds = ds.map(lambda path, label: (tf.io.read_file(path), label),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda encoded, label: (_to_uint8(decode_and_resize(encoded, image_size)), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(split: Split, image_size: int, batch_size: int, training: bool,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 cache: str = "memory", shuffle_buffer: int = 10000,
                 seed: Optional[int] = None) -> tf.data.Dataset:
    """Batches of (float32 images in [0, 255], int32 labels) for one pipeline.

    Args:
      split: what to read.
      image_size: side of the square images, pixels.
      batch_size: images per batch of this pipeline (per replica under a
        strategy: ``input_context.get_per_replica_batch_size``).
      training: shuffle, repeat forever and drop the last partial batch.
      input_context: the strategy's input context; each pipeline reads its
        own share of files.
      cache: 'memory', 'none' or a file path prefix.
      shuffle_buffer: images in the shuffle buffer.
      seed: shuffle seed; with a seed the order is reproducible.
    """
    ds = _read_examples(split, image_size, input_context)
    if cache == "memory":
        ds = ds.cache()
    elif cache != "none":
        suffix = f"_{input_context.input_pipeline_id}" if input_context else ""
        ds = ds.cache(f"{cache}_{split.name}_{image_size}{suffix}")
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32), labels),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
