"""Input pipelines: a data source -> tf.data datasets for train and eval.

Two kinds of source share one pipeline:

* image files, listed by :mod:`trainer.data.sources` from whatever the user
  has (split folders and their aliases, class folders only, Vertex AI import
  files) and screened by :mod:`trainer.data.screen` (small and medium runs,
  the demo);
* prepared TFRecords with a ``manifest.json`` (``trainer.prepare``), the
  format for large data and Cloud Storage.

Labels are int32 class indices, or with a multi-label task (a split's
``multi_hot`` is its class count) float32 k-hot vectors [k]: from the
listing's label sets, or from prepared records' ``image/class/labels``
(records of an older trainer hold one label, read as a one-hot vector).

With per-class weights (``--class_weighting=balanced``), training batches
are (images, labels, sample weights): the weights ride through ``tf.data``,
so they work in both phases, with the feature caches and under every
strategy (Keras's ``class_weight`` argument does not, with distributed
datasets).

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
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.data import records
from trainer.data import shard_check
from trainer.data import sources

SPLITS = sources.SPLITS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")  # What predict.py picks from a folder.
_PARSE_BATCH = 128  # Records parsed at once.


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: image files with labels, or TFRecord shards with a count."""

    name: str
    count: int
    paths: Tuple[str, ...] = ()
    labels: Tuple[int, ...] = ()
    shards: Tuple[str, ...] = ()
    manifest: str = ""  # Prepared records: the manifest.json they were listed from.
    # Every label of each image (image files); labels holds the first of each.
    label_sets: Tuple[Tuple[int, ...], ...] = ()
    multi_hot: int = 0  # Labels as k-hot vectors of this many classes; 0: class indices.
    # (path, content SHA-256) of each file as trainer/data/screen.py read it, in
    # listing order (empty: not screened); used only while it names ``paths`` exactly.
    digests: Tuple[Tuple[str, bytes], ...] = dataclasses.field(default=(), compare=False,
                                                                repr=False)

    @property
    def is_records(self) -> bool:
        return bool(self.shards)

    def subset(self, indices: Sequence[int], name: str = "") -> "Split":
        """The split's images at ``indices`` (image files), in that order."""
        return dataclasses.replace(
            self, name=name or self.name, count=len(indices),
            paths=tuple(self.paths[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            label_sets=tuple(self.label_sets[i] for i in indices) if self.label_sets else (),
            digests=())  # They named the whole split's paths (cache_key reads them so).

    def k_hot(self) -> np.ndarray:
        """float32 [count, multi_hot]: each image's labels (image files)."""
        sets = self.label_sets or tuple((label,) for label in self.labels)
        matrix = np.zeros((len(sets), self.multi_hot), np.float32)
        for row, label_set in enumerate(sets):
            matrix[row, list(label_set)] = 1.0
        return matrix


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Class names (index order) and the splits of a data folder."""

    class_names: Tuple[str, ...]
    splits: Dict[str, Split]
    # What the splits were listed from (None for prepared records): the data report.
    listing: Optional[sources.Listing] = dataclasses.field(default=None, compare=False)
    # Whether some training image has several labels (what --task=auto reads).
    has_multi_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multi_label(self) -> bool:
        """Whether the splits yield k-hot labels (``with_task``)."""
        return bool(self.splits["train"].multi_hot)

    def with_task(self, multi_label: bool) -> "DatasetInfo":
        """This info with every split's labels k-hot (multi-label) or class indices."""
        k = self.num_classes if multi_label else 0
        return dataclasses.replace(self, splits={
            name: dataclasses.replace(split, multi_hot=k) for name, split in self.splits.items()})


DataError = sources.DataError  # The data cannot be trained on; the message says why and where.


def describe(data_dir: str, test_fraction: float = 0.2, seed: int = 42,
             split_fractions: Sequence[float] = sources.DEFAULT_FRACTIONS,
             strict: bool = False, flatten_nested: bool = False) -> DatasetInfo:
    """Lists what ``data_dir`` names: class names and the files of each split.

    ``data_dir`` is any form :mod:`trainer.data.sources` accepts (split or
    class folders, import files) or prepared records. Without a test split,
    ``test_fraction`` of each validation class is held out as test, chosen by
    ``seed`` (the tutorial holds out a fifth of its validation batches);
    unassigned images are split by ``split_fractions`` (train, validation,
    test).

    Raises:
      DataError: the data cannot be trained on (the message names the file,
        folder or import row).
    """
    if sources.detect_layout(data_dir) == sources.LAYOUT_RECORDS:
        return _describe_records(data_dir.rstrip("/"))
    listing = sources.list_images(data_dir, sources.Options(
        tuple(split_fractions), test_fraction, seed, strict, flatten_nested))
    info = from_listing(listing)
    check_classes(info, data_dir)
    return info


def from_listing(listing: sources.Listing) -> DatasetInfo:
    """The DatasetInfo of a listing: its splits as paths and labels."""
    splits = {}
    for name in SPLITS:
        images = listing.split(name)
        if images or name != "test":
            splits[name] = Split(name, len(images), tuple(i.path for i in images),
                                 tuple(listing.label(i) for i in images),
                                 label_sets=tuple(listing.label_set(i) for i in images))
    return DatasetInfo(listing.class_names, splits, listing, listing.multi_label)


def check_classes(info: DatasetInfo, data_dir: str) -> None:
    """Raises DataError unless there are 2+ classes, each with images in train and validation."""
    if info.num_classes < 2:
        raise DataError(f"{data_dir} needs at least 2 classes, found {list(info.class_names)}.")
    for name in ("train", "validation"):
        split = info.splits[name]
        present = {k for label_set in (split.label_sets or [(y,) for y in split.labels])
                   for k in label_set}
        for label, class_name in enumerate(info.class_names):
            if label not in present:
                raise DataError(f"{data_dir}: class {class_name!r} has no images in {name}.")


def hold_out(split: Split, fraction: float, seed: int,
             name: str = "test") -> Tuple[Split, Split]:
    """Splits off a deterministic, per-class fraction of a split.

    The same choice as the one :mod:`trainer.data.sources` makes for a
    listing without test images (``sources.held_out``).

    Args:
      split: a split of image files (paths and labels).
      fraction: share of each class held out, rounded to whole images.
      seed: the choice of images depends on it alone.
      name: name of the held-out split.

    Returns:
      (the rest of ``split``, the held-out split named ``name``), each in the
      original order.
    """
    keep, hold = sources.held_out(split.labels, fraction, seed)
    return split.subset(keep), split.subset(hold, name)


def _describe_records(root: str) -> DatasetInfo:
    manifest = records.read_manifest(root)
    shard_check.check_shards(root, manifest)  # Missing or truncated: an error now, by name.
    splits = {
        name: Split(name, info["count"],
                    shards=tuple(f"{root}/{shard}" for shard in info["shards"]),
                    manifest=f"{root}/{records.MANIFEST}")
        for name, info in manifest["splits"].items() if info["count"]}
    return DatasetInfo(tuple(manifest["class_names"]), splits,
                       has_multi_label=bool(manifest.get("multi_label", False)))


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
        parse = (functools.partial(records.parse_examples_k_hot, num_classes=split.multi_hot)
                 if split.multi_hot else records.parse_examples)
        ds = ds.batch(_PARSE_BATCH).map(parse).unbatch()
        return ds.map(lambda encoded, label: (preprocess_image(encoded, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE)
    labels = split.k_hot() if split.multi_hot else list(split.labels)
    ds = tf.data.Dataset.from_tensor_slices((list(split.paths), labels))
    ds = ds.shard(num_pipelines, index)
    return ds.map(lambda path, label: (preprocess_image(tf.io.read_file(path), image_size), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(split: Split, image_size: int, batch_size: int, training: bool,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 cache: str = "memory", shuffle_buffer: int = 10000,
                 seed: Optional[int] = None, deterministic: bool = True,
                 repeat: bool = False,
                 augment: Optional[Callable] = None,
                 class_weights: Optional[Sequence[float]] = None) -> tf.data.Dataset:
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
      class_weights: a weight per class; batches then carry a third element,
        each example's weight (``with_sample_weights``).
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
    if class_weights is not None:
        ds = with_sample_weights(ds, class_weights)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def with_sample_weights(ds: tf.data.Dataset, class_weights: Sequence[float]) -> tf.data.Dataset:
    """(inputs, labels) batches -> (inputs, labels, each example's class weight)."""
    weights = tf.constant(list(class_weights), tf.float32)
    return ds.map(lambda inputs, labels: (inputs, labels, tf.gather(weights, labels)))
