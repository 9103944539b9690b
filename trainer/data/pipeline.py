"""Input pipelines: a data folder -> tf.data datasets for train and eval.

Two sources share one pipeline:

* an image folder with ``train/``, ``validation/`` and optionally ``test/``,
  each of class-named subfolders (small local runs, the demo);
* prepared TFRecords with a ``manifest.json`` (``trainer.prepare``), the
  format for large data and Cloud Storage.

The order, as one function reads it: list files -> shard per input pipeline
(one per worker, by whole files) -> interleave parallel reads -> parse in
batches -> decode and resize in parallel -> cache (decoded, resized uint8
images) -> shuffle + repeat (train only) -> batch -> prefetch. Batches stay
uint8: a quarter of float32's bytes to copy and to send to the accelerator;
the model casts them to float32 on the device (a Keras functional model casts
its inputs to its Input's dtype). Paths go through
``tf.io.gfile`` and ``tf.data``, so local and gs:// folders take the same
code.

Parallel stages keep their order by default (``deterministic=True``): with
a seed, every run yields the same elements in the same order. Measured in
benchmarks/input_pipeline.py, letting them hand on whichever element is ready
first was no faster, locally or from gs://, so it is an option only.
"""

import dataclasses
import functools
import random
from typing import Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SPLITS = ("train", "validation", "test")
_PARSE_BATCH = 128  # Records parsed at once.


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
        splits["validation"], splits["test"] = hold_out(splits["validation"], test_fraction, seed)
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


def hold_out(split: Split, fraction: float, seed: int,
             name: str = "test") -> Tuple[Split, Split]:
    """Splits off a deterministic, per-class fraction of a split.

    ``trainer.prepare`` holds out its test split with this same function, so
    prepared records and the image folder they came from split alike.

    Args:
      split: a split of image files (paths and labels).
      fraction: share of each class held out, rounded to whole images.
      seed: the choice of images depends on it alone.
      name: name of the held-out split.

    Returns:
      (the rest of ``split``, the held-out split named ``name``), each in the
      original order.
    """
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

    return subset(split.name, keep), subset(name, hold)


def _describe_records(root: str) -> DatasetInfo:
    manifest = records.read_manifest(root)
    splits = {
        name: Split(name, info["count"],
                    shards=tuple(f"{root}/{shard}" for shard in info["shards"]))
        for name, info in manifest["splits"].items() if info["count"]}
    return DatasetInfo(tuple(manifest["class_names"]), splits)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 [size, size, 3] in [0, 255].

    A JPEG is decoded at the smallest of libjpeg's scales (1, 1/2, 1/4, 1/8)
    that keeps both sides at least ``image_size`` (see ``jpeg_scale``), then
    resized: scaled decoding skips most of the inverse DCT, and it averages
    pixels, where bilinear resizing over a large ratio would skip them. The
    same function serves the exported model, so training and serving see
    identically decoded and resized pixels.
    """
    image = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: _decode_jpeg_scaled(encoded, image_size),
                    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size])


JPEG_SCALES = (1, 2, 4, 8)  # libjpeg decodes at 1/1, 1/2, 1/4 and 1/8 of full size.


def jpeg_scale(height: tf.Tensor, width: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index into JPEG_SCALES of the largest scale-down keeping both sides >= image_size."""
    short_side = tf.minimum(height, width)
    return tf.add_n([tf.cast(short_side >= image_size * ratio, tf.int32)
                     for ratio in JPEG_SCALES[1:]])


def _decode_jpeg_scaled(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    shape = tf.image.extract_jpeg_shape(encoded)  # Reads the header only.
    index = jpeg_scale(shape[0], shape[1], image_size)
    return tf.switch_case(index, [
        functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=ratio)
        for ratio in JPEG_SCALES])


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    # Cached as uint8: a quarter of float32's memory. Bilinear resizing keeps
    # values within [0, 255], so +0.5 and truncation round without a clip.
    return tf.cast(image + 0.5, tf.uint8)


def preprocess_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image -> uint8 [size, size, 3]: what the pipeline caches and batches.

    Works the same eagerly and inside ``tf.data`` (tests check both).
    """
    return _to_uint8(decode_and_resize(encoded, image_size))


def _pipeline_share(input_context: Optional[tf.distribute.InputContext]) -> Tuple[int, int]:
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _read_records(shards: Sequence[str], num_pipelines: int, index: int) -> tf.data.Dataset:
    """Serialized records of this pipeline's share of the shards."""
    files = tf.data.Dataset.from_tensor_slices(list(shards))
    if len(shards) >= num_pipelines:
        # Whole files per pipeline: each worker reads only its own shards.
        return files.shard(num_pipelines, index).interleave(
            tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
            num_parallel_calls=tf.data.AUTOTUNE)
    logging.warning("%d shards for %d input pipelines: every pipeline reads all shards and "
                    "keeps every %d-th record; prepare with --min_shards=%d or more.",
                    len(shards), num_pipelines, num_pipelines, num_pipelines)
    records_ds = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records_ds.shard(num_pipelines, index)


def _read_examples(split: Split, image_size: int,
                   input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """(uint8 image, label) pairs of this input pipeline's share of a split."""
    num_pipelines, index = _pipeline_share(input_context)
    if split.is_records:
        ds = _read_records(split.shards, num_pipelines, index)

        ds = ds.batch(_PARSE_BATCH).map(records.parse_examples).unbatch()
        return ds.map(lambda encoded, label: (preprocess_image(encoded, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE)
    ds = tf.data.Dataset.from_tensor_slices((list(split.paths), list(split.labels)))
    ds = ds.shard(num_pipelines, index)
    return ds.map(lambda path, label: (preprocess_image(tf.io.read_file(path), image_size), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(split: Split, image_size: int, batch_size: int, training: bool,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 cache: str = "memory", shuffle_buffer: int = 10000,
                 seed: Optional[int] = None, deterministic: bool = True,
                 repeat: bool = False,
                 augment: Optional[Callable] = None) -> tf.data.Dataset:
    """Batches of (uint8 images, int32 labels) for one pipeline.

    Images come as uint8 [batch, size, size, 3]; Keras models cast them to
    float32 in their first step. With ``augment``, they come as float32 in
    [0, 255] (augmentation works on floats).

    Args:
      split: what to read.
      image_size: side of the square images, pixels.
      batch_size: images per batch of this pipeline (per replica under a
        strategy: ``input_context.get_per_replica_batch_size``).
      training: shuffle, repeat forever and drop the last partial batch.
      repeat: for evaluation data, repeat whole passes forever (validation
        inside ``fit``, which takes a fixed number of steps per epoch).
      augment: a callable applied to float image batches with
        ``training=True`` (Keras augmentation layers), or None.
      input_context: the strategy's input context; each pipeline reads its
        own share of files.
      cache: 'memory', 'none' or a file path prefix (local or gs://) for an
        on-disk cache, for data larger than memory.
      shuffle_buffer: images in the shuffle buffer.
      seed: shuffle seed.
      deterministic: keep every parallel stage in order, so that with a
        ``seed`` each run yields the same elements in the same order; off,
        stages may hand on whichever element is ready first.
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
    if repeat and not training:
        ds = ds.repeat()  # Whole passes: batches never straddle two passes.
    if augment is not None:
        ds = ds.map(lambda images, labels: (augment(tf.cast(images, tf.float32), training=True),
                                            labels),
                    num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
