"""The TFRecord schema: tf.train.Example <-> fields, and the manifest.

Feature names follow the conventions of TensorFlow's image datasets
(``image/encoded``, ``image/class/label``, ...), so records can be read by
other tools too. ``manifest.json`` at the root of a prepared folder lists the
class names in index order, counts and shards of each split.
"""

import json
from typing import Dict

import tensorflow as tf

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

ENCODED = "image/encoded"
FORMAT = "image/format"
LABEL = "image/class/label"
CLASS_NAME = "image/class/text"
HEIGHT = "image/height"
WIDTH = "image/width"
SOURCE = "image/source_path"
HASH = "image/sha256"

_FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(encoded: bytes, image_format: str, label: int, class_name: str,
                 height: int, width: int, source: str, sha256: str) -> tf.train.Example:
    """One image as a tf.train.Example."""
    return tf.train.Example(features=tf.train.Features(feature={
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
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    return parsed[ENCODED], tf.cast(parsed[LABEL], tf.int32)


def read_manifest(root: str) -> Dict:
    with tf.io.gfile.GFile(f"{root.rstrip('/')}/{MANIFEST}") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root}/{MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"this trainer reads {FORMAT_VERSION}; re-run trainer.prepare.")
    return manifest
