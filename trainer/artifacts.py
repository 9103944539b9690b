"""Every exported artifact run by its own runtime on a split: accuracy, agreement, size, latency.

The artifacts of a job are its SavedModel (run by TensorFlow), the TFLite
files (the TFLite interpreter) and the ONNX file (onnxruntime). Each one
classifies every image of the split one at a time, as an app or a single
online request would, and is measured on:

* ``accuracy`` on the split (at most MAX_IMAGES of it, spread evenly);
* ``agreement``: share of images whose top label equals the SavedModel's;
* ``max_probability_difference`` from the SavedModel's probabilities;
* ``size_bytes``: the file (SavedModel: ``saved_model.pb`` plus
  ``variables/``, what serving loads);
* ``latency_ms``: median wall time of one single-image call on this
  machine, over every image of the split after WARMUP calls (``p90`` too).
  TFLite and onnxruntime run on ``THREADS`` thread(s), the usual setting on a
  phone core and the fair one on a shared machine; the SavedModel runs with
  TensorFlow's default threads.

A multi-label model (one with thresholds, trainer/thresholds.py) is
measured on its thresholded labels instead: ``micro_f1`` on the split in
place of ``accuracy``, ``agreement`` as the share of images whose label set
(the classes at or above their thresholds) equals the SavedModel's, and
``label_agreement`` as the share of (image, class) decisions that agree.

``train.py`` records the result in ``metrics.json`` under ``exports``.
"""

import time
from typing import Callable, Dict, Mapping

import numpy as np
import tensorflow as tf

from trainer import export
from trainer import multilabel_metrics
from trainer import onnx_export
from trainer import thresholds as thresholds_lib
from trainer import tflite
from trainer.data import pipeline

SAVED_MODEL = "saved_model"
THREADS = 1
WARMUP = 3
# A larger split is sampled evenly (every artifact sees the same images): each
# image runs once per artifact, alone, and all of them are held in memory.
MAX_IMAGES = 1000


def find_artifacts(job_dir: str) -> Dict[str, str]:
    """Artifact name -> path of the TFLite and ONNX files a job wrote (those present)."""
    job_dir = job_dir.rstrip("/")
    found = {f"tflite_{variant}": tflite.tflite_path(f"{job_dir}/tflite", variant)
             for variant in tflite.VARIANTS}
    found["onnx"] = f"{job_dir}/onnx/{onnx_export.ONNX_FILE}"
    return {name: path for name, path in found.items() if tf.io.gfile.exists(path)}


def runner(name: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function of one float32 [size, size, 3] image to its probabilities [classes],
    by the artifact's own runtime."""
    if name == SAVED_MODEL:
        serve = tf.saved_model.load(path).signatures["serving_images"]
        return lambda image: serve(images=tf.constant(image[np.newaxis]))[
            "probabilities"].numpy()[0]
    if name.startswith("tflite_"):
        return tflite.classifier(path, num_threads=THREADS)
    if name == "onnx":
        session = onnx_export.session(path, num_threads=THREADS)
        return lambda image: session.run(["probabilities"], {"images": image[np.newaxis]})[0][0]
    raise ValueError(f"Unknown artifact {name!r}.")


def size_bytes(path: str) -> int:
    """A file's size; for a SavedModel folder, saved_model.pb plus variables/."""
    if not tf.io.gfile.isdir(path):
        return tf.io.gfile.stat(path).length
    files = [f"{path}/saved_model.pb"] + [
        f"{path}/variables/{name}" for name in tf.io.gfile.listdir(f"{path}/variables")]
    return sum(tf.io.gfile.stat(f).length for f in files)


def split_images(split: pipeline.Split, image_size: int, max_images: int = MAX_IMAGES):
    """Up to ``max_images`` images of a split, spread over it, as float32
    [n, size, size, 3] pixels, and their labels [n]."""
    dataset = pipeline.make_dataset(tflite.spread_sample(split, max_images), image_size, 64,
                                    training=False, cache="none")
    batches = [(x.numpy(), y.numpy()) for x, y in dataset.take(-(-max_images // 64))]
    images, labels = (np.concatenate(part) for part in zip(*batches))
    return images[:max_images].astype(np.float32), labels[:max_images]


def run_one_at_a_time(classify_one: Callable, images: np.ndarray):
    """Probabilities [n, classes] and per-call seconds [n] of single-image calls."""
    outputs, seconds = [], []
    for image in images:
        start = time.perf_counter()
        outputs.append(np.asarray(classify_one(image), np.float32))
        seconds.append(time.perf_counter() - start)
    return np.stack(outputs), np.asarray(seconds)


def measure(model_dir: str, artifacts: Mapping[str, str], split: pipeline.Split,
            image_size: int) -> Dict:
    """Measures the SavedModel and each artifact on ``split`` (see the module docstring).

    Args:
      model_dir: the exported SavedModel, the reference.
      artifacts: name (``tflite_<variant>`` or ``onnx``) -> path.
      split: the split to classify (the test split).
      image_size: the model's input side, pixels.

    Returns:
      {"split": name, "count": images run (at most MAX_IMAGES, spread over the
      split), "threads": THREADS, "artifacts": {name: {...}}}, the SavedModel
      first.
    """
    model_dir = export.resolve_model_dir(model_dir)
    images, labels = split_images(split, image_size)
    thresholds = thresholds_lib.read(model_dir)
    if thresholds is not None:
        thresholds = np.asarray([thresholds[n] for n in export.read_class_names(model_dir)])
    results, reference = {}, None
    for name, path in {SAVED_MODEL: model_dir, **artifacts}.items():
        probabilities, seconds = run_one_at_a_time(runner(name, path), images)
        if reference is None:
            reference = probabilities
        timed = seconds[WARMUP:] if len(seconds) > WARMUP else seconds
        results[name] = {
            "path": path,
            **(_multi_label_scores(probabilities, reference, labels, thresholds)
               if thresholds is not None else
               {"accuracy": float((probabilities.argmax(axis=1) == labels).mean()),
                "agreement": float((probabilities.argmax(axis=1)
                                    == reference.argmax(axis=1)).mean())}),
            "max_probability_difference": float(np.abs(probabilities - reference).max()),
            "size_bytes": size_bytes(path),
            "latency_ms": float(np.median(timed) * 1e3),
            "latency_ms_p90": float(np.percentile(timed, 90) * 1e3),
        }
    return {"split": split.name, "count": int(len(labels)), "threads": THREADS,
            "artifacts": results}


def _multi_label_scores(scores: np.ndarray, reference: np.ndarray, truth: np.ndarray,
                        thresholds: np.ndarray) -> Dict:
    """Micro F1 and agreement with the SavedModel of thresholded labels."""
    predicted, expected = scores >= thresholds, reference >= thresholds
    names = [str(k) for k in range(len(thresholds))]
    return {"micro_f1": multilabel_metrics.multilabel_metrics(
                scores, truth, thresholds, names)["micro_f1"],
            "agreement": float((predicted == expected).all(axis=1).mean()),
            "label_agreement": float((predicted == expected).mean())}
