"""The TFRecord schema: tf.train.Example <-> fields, shard names, and the manifest.

Feature names follow the conventions of TensorFlow's image datasets
(``image/encoded``, ``image/class/label``, ...), so records can be read by
other tools too. Every record holds:

==========================  ======  =============================================
feature                     type    value
==========================  ======  =============================================
``image/encoded``           bytes   the image as RGB JPEG
``image/format``            bytes   ``jpeg``
``image/class/label``       int64   class index, into the manifest's class_names
                                    (a multi-label image's first label)
``image/class/text``        bytes   class name
``image/class/labels``      int64[] every label's class index (multi-label
                                    images only; absent in records of older
                                    trainers and of single-label images)
``image/height``            int64   height of the stored image, pixels
``image/width``             int64   width of the stored image, pixels
``image/source_path``       bytes   the source file, relative to the input folder
``image/sha256``            bytes   hex SHA-256 of the source file's bytes
==========================  ======  =============================================

A prepared folder holds ``<split>/<split>-NNNNN-of-MMMMM.tfrecord`` shards,
``prepare_report.json`` and, written last, ``manifest.json``:

* ``format_version``: this module's FORMAT_VERSION;
* ``class_names``: class names in label order;
* ``multi_label``: whether some image has several labels (absent: none);
* ``splits``: for each split, ``count`` (records), ``classes`` (records per
  class name; a multi-label image counts in each of its classes), ``shards`` (paths relative to the folder), ``shard_sizes``
  (each shard's file size, checked before training by
  :mod:`trainer.data.shard_check`) and ``bytes``;
* ``image_stats``: min, max and mean of stored ``height``, ``width`` and
  ``encoded_bytes``;
* ``source``: input folder, layout, files listed and a fingerprint of the
  plan that made the shards (what a re-run compares);
* ``options``: the preparation options;
* ``report``: the report's file name.
"""

import json
import re
import uuid
from typing import Dict, Sequence

import tensorflow as tf

MANIFEST = "manifest.json"
REPORT = "prepare_report.json"
FORMAT_VERSION = 1
JPEG = "jpeg"

ENCODED = "image/encoded"
FORMAT = "image/format"
LABEL = "image/class/label"
CLASS_NAME = "image/class/text"
LABELS = "image/class/labels"
HEIGHT = "image/height"
WIDTH = "image/width"
SOURCE = "image/source_path"
HASH = "image/sha256"

_FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
}
_K_HOT_FEATURES = {**_FEATURES, LABELS: tf.io.RaggedFeature(tf.int64)}

ALL_FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    FORMAT: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    CLASS_NAME: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    SOURCE: tf.io.FixedLenFeature([], tf.string),
    HASH: tf.io.FixedLenFeature([], tf.string),
}

# A shard as written, or one of its temporary names ('.tmp-<hex>').
SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-\d{5}-of-\d{5}\.tfrecord(?P<temp>\.tmp-[0-9a-f]+)?$")


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(encoded: bytes, image_format: str, label: int, class_name: str,
                 height: int, width: int, source: str, sha256: str,
                 label_set: Sequence[int] = ()) -> tf.train.Example:
    """One image as a tf.train.Example; ``label_set``: every label of a multi-label image."""
    extra = {}
    if len(label_set) > 1:
        extra[LABELS] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(label_set)))
    return tf.train.Example(features=tf.train.Features(feature={
        **extra,
        ENCODED: _bytes(encoded),
        FORMAT: _bytes(image_format.encode()),
        LABEL: _int(label),
        CLASS_NAME: _bytes(class_name.encode()),
        HEIGHT: _int(height),
        WIDTH: _int(width),
        SOURCE: _bytes(source.encode()),
        HASH: _bytes(sha256.encode()),
    }))


def parse_example(serialized: tf.Tensor):
    """Serialized Example -> (encoded image bytes, int32 label)."""
    return _image_and_label(tf.io.parse_single_example(serialized, _FEATURES))


def parse_examples(serialized: tf.Tensor):
    """A batch of serialized Examples -> (encoded image bytes [n], int32 labels [n]).

    Parsing a batch at once costs less per record than one at a time.
    """
    return _image_and_label(tf.io.parse_example(serialized, _FEATURES))


def parse_examples_k_hot(serialized: tf.Tensor, num_classes: int):
    """A batch of serialized Examples -> (encoded bytes [n], float32 k-hot labels [n, k]).

    ``image/class/labels`` when a record has it, else its one label: records
    written before multi-label (or of single-label images) read as one-hot.
    """
    parsed = tf.io.parse_example(serialized, _K_HOT_FEATURES)
    labels = parsed[LABELS]
    listed = tf.reduce_max(tf.one_hot(labels, num_classes, dtype=tf.float32), axis=1)
    listed = listed.to_tensor() if isinstance(listed, tf.RaggedTensor) else listed
    single = tf.one_hot(parsed[LABEL], num_classes, dtype=tf.float32)
    has_list = labels.row_lengths()[:, tf.newaxis] > 0
    return parsed[ENCODED], tf.where(has_list, tf.maximum(listed, 0.0), single)


def _image_and_label(parsed: Dict[str, tf.Tensor]):
    return parsed[ENCODED], tf.cast(parsed[LABEL], tf.int32)


def parse_all(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Serialized Example -> every field of the schema, by feature name."""
    return tf.io.parse_single_example(serialized, ALL_FEATURES)


def shard_path(split: str, index: int, count: int) -> str:
    """A shard's path relative to the prepared folder."""
    return f"{split}/{split}-{index:05d}-of-{count:05d}.tfrecord"


def temporary_name(path: str) -> str:
    """A unique name to write ``path`` under until it is complete."""
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def write_json(path: str, value: Dict) -> None:
    """Writes JSON under a temporary name, then renames: readers never see half a file."""
    temp = temporary_name(path)
    with tf.io.gfile.GFile(temp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(temp, path, overwrite=True)


def write_manifest(root: str, manifest: Dict) -> str:
    """Writes ``manifest.json`` at ``root``; returns its path."""
    path = f"{root.rstrip('/')}/{MANIFEST}"
    write_json(path, {**manifest, "format_version": FORMAT_VERSION})
    return path


def read_manifest(root: str) -> Dict:
    with tf.io.gfile.GFile(f"{root.rstrip('/')}/{MANIFEST}") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root}/{MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"this trainer reads {FORMAT_VERSION}; re-run trainer.prepare.")
    return manifest
