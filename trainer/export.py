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

A multi-label model (exported with ``thresholds``) returns besides:
``scores`` [batch, classes], each class's own sigmoid probability (also
``probabilities``, which then need not sum to 1); ``thresholds`` [batch,
classes]; ``labels`` [batch, classes] string: the names of the classes whose
score is >= their threshold, highest score first, padded with "" (a row of
"" only: no label); ``label_count`` [batch] int32, the number of labels. Its
``label``, ``score`` and ``class_index`` are the top class's. The thresholds
are saved as the ``thresholds`` variable and in ``thresholds.json``
(trainer/thresholds.py).

Layout: versioned, as TensorFlow Serving reads a model's base path::

    model/            the deploy path (AIP_MODEL_DIR, <job_dir>/model)
      1/              a complete SavedModel (+ class_names.json, backbone.h5)
      2/              the next export's

Why: on gs:// a folder cannot be replaced atomically (a rename is a copy
and a delete per object), so a model is never rewritten in place. An export
writes the whole model to a local staging folder, loads it back and runs it
once, then copies it into the next numbered folder with ``saved_model.pb``
last. A version folder holding ``saved_model.pb`` is therefore complete (every
other file was written before it), and nothing writes into it afterwards.
:func:`resolve_model_dir` gives the newest complete version: the folder to
load, serve or upload to Vertex AI (whose Model upload wants a folder holding
saved_model.pb). At every instant it is the previous model or the new one,
whole. The export then retires versions older than the previous one
(``saved_model.pb`` first, so a folder being deleted is no longer complete).
A model of the old, unversioned layout (``model/saved_model.pb``) still
resolves, and counts as version 0.
"""

import json
import os
import sys
import tempfile
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras
from absl import logging

from trainer import model as model_lib
from trainer import storage
from trainer import thresholds as thresholds_lib
from trainer.data import pipeline

CLASS_NAMES_FILE = "class_names.json"
BACKBONE_WEIGHTS_FILE = "backbone.h5"
SAVED_MODEL_FILE = "saved_model.pb"


class Serving(tf.Module):
    """The classifier with its class names and input decoding."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], image_size: int,
                 thresholds: Optional[Sequence[float]] = None):
        super().__init__()
        # The Keras model itself is not saved, only its variables (which the signatures
        # read): saved as a Keras object it would add every layer's own traced
        # functions, which made the export ~4x slower to save and to load.
        self._model = self._no_dependency(model)
        self.model_variables = list(model.variables)
        self._multi_label = thresholds is not None
        if self._multi_label:  # Saved with the model; its signatures apply them.
            self.thresholds = tf.Variable(np.asarray(thresholds, np.float32), trainable=False,
                                          name="thresholds")
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
        logits = self._model(images, training=False)
        probabilities = model_lib.probabilities(logits, self._num_classes, self._multi_label)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        outputs = {
            "probabilities": probabilities,
            "class_index": index,
            "label": tf.gather(self.class_names, index),
            "score": tf.reduce_max(probabilities, axis=-1),
            "class_names": tf.tile(self.class_names[tf.newaxis], [tf.shape(images)[0], 1]),
        }
        if self._multi_label:
            outputs.update(self._labels_above(probabilities, outputs["class_names"]))
        return outputs

    def _labels_above(self, scores, class_names):
        """The multi-label outputs: classes at or above their thresholds, best first."""
        thresholds = tf.broadcast_to(self.thresholds, tf.shape(scores))
        above = scores >= thresholds
        # Labels first (by score), then the rest: one sort puts them in front.
        order = tf.argsort(scores + 2.0 * tf.cast(above, scores.dtype), axis=-1,
                           direction="DESCENDING")
        return {
            "scores": scores,
            "thresholds": thresholds,
            "labels": tf.where(tf.gather(above, order, batch_dims=1),
                               tf.gather(class_names, order, batch_dims=1), ""),
            "label_count": tf.reduce_sum(tf.cast(above, tf.int32), axis=-1),
        }

    def _serve_bytes(self, image_bytes):
        size = self._image_size
        images = tf.map_fn(lambda b: pipeline.decode_and_resize(b, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return self._predict(images)

    def _serve_images(self, images):
        return self._predict(tf.image.resize(images, [self._image_size, self._image_size]))


def export_model(model: keras.Model, class_names: Sequence[str], image_size: int,
                 model_dir: str, thresholds: Optional[Sequence[float]] = None) -> str:
    """Adds a serving SavedModel to ``model_dir`` as its next numbered version.

    Under MultiWorkerMirroredStrategy every worker must call this (the save
    runs collective ops); non-chief workers pass a scratch folder. Call it
    outside ``strategy.scope()``.

    ``thresholds``: a multi-label model's per-class decision thresholds
    (None: single-label).

    Returns:
      The new version's folder (what :func:`resolve_model_dir` now gives).

    Raises:
      ValueError: the new model gives non-finite probabilities; ``model_dir``
        is then untouched.
    """
    model_dir = model_dir.rstrip("/")
    _finish_interrupted_swap(model_dir)
    with tempfile.TemporaryDirectory(prefix="export_") as staging:
        staged = os.path.join(staging, "model")
        stage_model(model, class_names, image_size, staged, thresholds)
        return publish(staged, model_dir)


def stage_model(model: keras.Model, class_names: Sequence[str], image_size: int,
                folder: str, thresholds: Optional[Sequence[float]] = None) -> str:
    """Writes the serving SavedModel and its files to a local ``folder``, checked to load."""
    save_serving(Serving(model, class_names, image_size, thresholds), folder)
    with tf.io.gfile.GFile(f"{folder}/{CLASS_NAMES_FILE}", "w") as f:
        json.dump(list(class_names), f)
    if thresholds is not None:
        thresholds_lib.write(folder, class_names, thresholds)
    save_backbone_weights(model, f"{folder}/{BACKBONE_WEIGHTS_FILE}")
    _check_loads(folder, image_size)
    return folder


def save_serving(serving: tf.Module, folder: str) -> None:
    """``tf.saved_model.save`` of a serving module with its two signatures."""
    tf.saved_model.save(serving, folder, signatures={
        "serving_default": serving.serve_bytes,
        "serving_images": serving.serve_images,
    })


def publish(staged: str, model_dir: str) -> str:
    """Copies a staged model into ``model_dir``'s next version folder, saved_model.pb last.

    Then removes what no reader can be using any more: folders of
    interrupted exports, and versions older than the previous one.

    Returns:
      The new version's folder.
    """
    model_dir = model_dir.rstrip("/")
    number = max(_versions(model_dir), default=0) + 1
    target = f"{model_dir}/{number}"
    files = sorted(os.path.relpath(os.path.join(d, n), staged)
                   for d, _, names in os.walk(staged) for n in names)
    # saved_model.pb last: its presence is what makes the folder complete.
    files.sort(key=lambda name: name == SAVED_MODEL_FILE)
    with storage.explain_failures(
            f"Exporting the model to {target}",
            f"{model_dir} still resolves to the previous model, whole; the next export "
            "writes a new version and removes this one."):
        for name in files:
            destination = f"{target}/{name}"
            tf.io.gfile.makedirs(destination.rsplit("/", 1)[0])
            tf.io.gfile.copy(os.path.join(staged, name), destination, overwrite=True)
    logging.info("Exported model version %d: %s", number, target)
    try:
        _retire(model_dir, number)
    except tf.errors.OpError as e:
        if not storage.is_storage_failure(e):
            raise
        # Housekeeping only: the new version is complete and resolves.
        logging.warning("Could not remove old versions under %s; the next export "
                        "retries: %s", model_dir, e.message.splitlines()[0])
    return target


def resolve_model_dir(path: str) -> str:
    """The complete SavedModel folder to load, serve or upload for ``path``.

    ``path`` may be a deploy path of numbered versions (the newest complete
    one is returned), a SavedModel folder itself (a version folder, or a
    model of the old unversioned layout: returned as it is), local or gs://.

    Raises:
      FileNotFoundError: no complete SavedModel there, naming the path.
    """
    path = path.rstrip("/")
    complete = [n for n in _versions(path) if _is_complete(f"{path}/{n}")]
    if complete:
        return f"{path}/{max(complete)}"
    if _is_complete(path):
        return path
    raise FileNotFoundError(
        f"No exported model at {path}: neither {path}/{SAVED_MODEL_FILE} nor a numbered "
        f"version folder holding one ({path}/1/{SAVED_MODEL_FILE}, written by the trainer's "
        "export). Pass a job's model folder, e.g. --model=job/model.")


def read_class_names(model_dir: str) -> list:
    """Class names of an exported model (any path resolve_model_dir takes), in index order."""
    with tf.io.gfile.GFile(f"{resolve_model_dir(model_dir)}/{CLASS_NAMES_FILE}") as f:
        return json.load(f)


def read_image_size(model_dir: str) -> int:
    """Side of the square input of an exported model, pixels."""
    return int(tf.saved_model.load(resolve_model_dir(model_dir)).image_size.numpy())


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
    """Puts back a model that an export of the old layout left at ``target.previous``.

    Exports before the versioned layout swapped folders by two renames; a
    kill between them left no model at ``target`` and the last good one at
    ``target.previous`` (and maybe a ``target.partial``, removed here).
    """
    previous, partial = f"{target}.previous", f"{target}.partial"
    if not tf.io.gfile.exists(target) and tf.io.gfile.exists(previous):
        tf.io.gfile.rename(previous, target)
    if tf.io.gfile.exists(partial):
        tf.io.gfile.rmtree(partial)


def _versions(model_dir: str) -> List[int]:
    """Numbers of the version folders under ``model_dir``, complete or not."""
    if not tf.io.gfile.isdir(model_dir):
        return []
    return [int(name.rstrip("/")) for name in tf.io.gfile.listdir(model_dir)
            if name.rstrip("/").isdigit()]


def _is_complete(folder: str) -> bool:
    return tf.io.gfile.exists(f"{folder}/{SAVED_MODEL_FILE}")


def _retire(model_dir: str, newest: int) -> None:
    """Removes interrupted exports and versions older than the newest two complete ones.

    The previous complete version stays: a reader that resolved the deploy
    path just before ``newest`` was complete may still be loading it. A
    model of the old layout at the top of ``model_dir`` counts as version 0.
    """
    complete = sorted(n for n in _versions(model_dir) if _is_complete(f"{model_dir}/{n}"))
    if _is_complete(model_dir):
        complete.insert(0, 0)
    keep = set(complete[-2:]) | {newest}
    for number in _versions(model_dir):
        if number not in keep:
            _remove_version(f"{model_dir}/{number}")
    if 0 in complete and 0 not in keep:
        _remove_unversioned(model_dir)


def _remove_version(folder: str) -> None:
    # saved_model.pb first: from then on no reader takes the folder for complete.
    if _is_complete(folder):
        tf.io.gfile.remove(f"{folder}/{SAVED_MODEL_FILE}")
    tf.io.gfile.rmtree(folder)


def _remove_unversioned(model_dir: str) -> None:
    """Removes an old-layout model's files from the top of ``model_dir``, saved_model.pb first."""
    tf.io.gfile.remove(f"{model_dir}/{SAVED_MODEL_FILE}")
    for name in tf.io.gfile.listdir(model_dir):
        name = name.rstrip("/")
        if name.isdigit():
            continue
        path = f"{model_dir}/{name}"
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)


def main(argv: Sequence[str]) -> int:
    """``python -m trainer.export PATH``: prints the complete model folder of PATH."""
    if len(argv) != 2:
        print("Usage: python -m trainer.export MODEL_DIR  (prints the folder to serve or "
              "upload, e.g. job/model/3)", file=sys.stderr)
        return 2
    try:
        print(resolve_model_dir(argv[1]))
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
