"""Export: a SavedModel that serves raw image bytes, written atomically.

Signatures:

* ``serving_default(image_bytes: string[batch])`` takes encoded JPEG/PNG/GIF/
  BMP bytes. The ``_bytes`` suffix lets Vertex AI prediction accept
  ``{"image_bytes": {"b64": ...}}`` instances.
* ``serving_images(images: float32[batch, h, w, 3])`` takes pixels in
  [0, 255], resized to the model's input size.

Both return ``probabilities`` [batch, classes], ``class_index``, ``label``,
``score`` and ``class_names`` [batch, classes]. The model's input size is
saved with it (``image_size``), so tools that read images for it (evaluate,
TFLite) need no flag for it.

A new model is written to a temporary sibling folder, loaded back and run
once, and only then moved into place; the previous model is removed last, so
a failed export never replaces a good model.
"""

import json
import os
import tempfile
from typing import Sequence

import tensorflow as tf
import tf_keras as keras

from trainer import model as model_lib
from trainer.data import pipeline

CLASS_NAMES_FILE = "class_names.json"
BACKBONE_WEIGHTS_FILE = "backbone.h5"


class _Serving(tf.Module):
    """The classifier with its class names and input decoding."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], image_size: int):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(list(class_names))
        self._num_classes = len(class_names)
        self._image_size = image_size
        # Saved with the model, read back by read_image_size().
        self.image_size = tf.Variable(image_size, trainable=False, dtype=tf.int32,
                                      name="image_size")
        self.serve_bytes = tf.function(self._serve_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.serve_images = tf.function(self._serve_images, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])

    def _predict(self, images):
        logits = self.model(images, training=False)
        probabilities = model_lib.probabilities(logits, self._num_classes)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_index": index,
            "label": tf.gather(self.class_names, index),
            "score": tf.reduce_max(probabilities, axis=-1),
            "class_names": tf.tile(self.class_names[tf.newaxis], [tf.shape(images)[0], 1]),
        }

    def _serve_bytes(self, image_bytes):
        size = self._image_size
        images = tf.map_fn(lambda b: pipeline.decode_and_resize(b, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return self._predict(images)

    def _serve_images(self, images):
        return self._predict(tf.image.resize(images, [self._image_size, self._image_size]))


def export_model(model: keras.Model, class_names: Sequence[str], image_size: int,
                 model_dir: str) -> str:
    """Saves a serving SavedModel to ``model_dir`` without ever leaving a partial one there.

    Under MultiWorkerMirroredStrategy every worker must call this (the save
    runs collective ops); non-chief workers pass a scratch folder. Call it
    outside ``strategy.scope()``.

    Returns:
      model_dir.
    """
    model_dir = model_dir.rstrip("/")
    _finish_interrupted_swap(model_dir)
    partial = f"{model_dir}.partial"
    if tf.io.gfile.exists(partial):
        tf.io.gfile.rmtree(partial)
    serving = _Serving(model, class_names, image_size)
    tf.saved_model.save(serving, partial, signatures={
        "serving_default": serving.serve_bytes,
        "serving_images": serving.serve_images,
    })
    with tf.io.gfile.GFile(f"{partial}/{CLASS_NAMES_FILE}", "w") as f:
        json.dump(list(class_names), f)
    save_backbone_weights(model, f"{partial}/{BACKBONE_WEIGHTS_FILE}")
    _check_loads(partial, image_size)
    _move_into_place(partial, model_dir)
    return model_dir


def read_class_names(model_dir: str) -> list:
    """Class names of an exported model, in index order."""
    with tf.io.gfile.GFile(f"{model_dir.rstrip('/')}/{CLASS_NAMES_FILE}") as f:
        return json.load(f)


def read_image_size(model_dir: str) -> int:
    """Side of the square input of an exported model, pixels."""
    return int(tf.saved_model.load(model_dir).image_size.numpy())


def save_backbone_weights(model: keras.Model, path: str) -> None:
    """The trained backbone as a Keras h5 weights file, reusable as --weights."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        model_lib.get_backbone(model).save_weights(local)
        tf.io.gfile.copy(local, path, overwrite=True)


def _check_loads(path: str, image_size: int) -> None:
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_images"](
        images=tf.zeros([1, image_size, image_size, 3]))
    if not bool(tf.reduce_all(tf.math.is_finite(outputs["probabilities"]))):
        raise ValueError(f"Exported model at {path} gives non-finite probabilities.")


def _finish_interrupted_swap(target: str) -> None:
    """Puts the previous model back if a kill fell between _move_into_place's renames.

    Such a kill leaves no model at ``target``, the last good one at
    ``target.previous`` and a new one at ``target.partial``; the export
    about to run rewrites the new one.
    """
    previous = f"{target}.previous"
    if not tf.io.gfile.exists(target) and tf.io.gfile.exists(previous):
        tf.io.gfile.rename(previous, target)


def _move_into_place(partial: str, target: str) -> None:
    previous = f"{target}.previous"
    if tf.io.gfile.exists(target):
        if tf.io.gfile.exists(previous):
            tf.io.gfile.rmtree(previous)
        tf.io.gfile.rename(target, previous)
    tf.io.gfile.rename(partial, target)
    if tf.io.gfile.exists(previous):
        tf.io.gfile.rmtree(previous)
