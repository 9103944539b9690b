"""TFLite export: float32, float16, dynamic-range and full-integer models of the SavedModel.

The TFLite models are converted from the SavedModel's ``serving_images``
signature, so they hold the served model itself: the same weights and the
same preprocessing layers inside. Phones and edge devices decode images
themselves, so the image-bytes decoding stays out:

* input ``images``: [1, size, size, 3], RGB pixels in [0, 255]: float32, or
  uint8 for ``int8``;
* output ``probabilities``: [1, classes]: float32, or uint8 for ``int8``
  (probability = scale * (q - zero_point), from the tensor's quantization);
* ``labels.txt`` beside the models: class names, one a line, in index order
  (the layout the TFLite task libraries and image-classification apps read);
  for a multi-label model also ``thresholds.json`` ({class: threshold}): its
  ``probabilities`` are then each class's sigmoid, a class present when at or
  above its threshold.
  Not TFLite metadata: the library that writes it (tflite-support 0.4.4, its
  last release) requires protobuf < 4, and TensorFlow 2.21 protobuf >= 6.31.

Variants:

* ``float``: float32 weights; matches the SavedModel to float rounding.
* ``float16``: float16 weights (half the size), float32 compute on CPU;
  GPU delegates run it in float16.
* ``dynamic_range``: int8 weights, float activations (about a quarter of the
  size); needs no calibration data.
* ``int8``: integer weights and activations, uint8 input and output, the
  form integer-only accelerators (Edge TPU, NPUs, microcontrollers) run.
  Activation ranges are calibrated on a representative sample of the train
  split (CALIBRATION_IMAGES images spread over it).

Command line, over any exported model::

    python -m trainer.tflite --model=job/model --output_dir=job/tflite \
        [--data_dir=data]  # int8 too: its calibration images
"""

import warnings
from typing import Dict, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from trainer import export
from trainer import thresholds as thresholds_lib
from trainer.data import pipeline

FLOAT = "float"
FLOAT16 = "float16"
DYNAMIC_RANGE = "dynamic_range"
INT8 = "int8"
VARIANTS = (FLOAT, FLOAT16, DYNAMIC_RANGE, INT8)
NEEDS_CALIBRATION = (INT8,)
LABELS_FILE = "labels.txt"
# TensorFlow's guide asks for "around 100-500" representative samples. On
# cats-vs-dogs (MobileNetV2, 224 px) 500 gave 0.985 test accuracy, 200 gave
# 0.980 (float32: 0.990); benchmarks/results/exports.md.
CALIBRATION_IMAGES = 500


def tflite_path(output_dir: str, variant: str) -> str:
    return f"{output_dir.rstrip('/')}/model_{variant}.tflite"


def convert(model_dir: str, variant: str = FLOAT,
            calibration_images: Optional[np.ndarray] = None) -> bytes:
    """Converts an exported model to a TFLite flatbuffer.

    Args:
      model_dir: exported SavedModel folder, local or gs://.
      variant: one of VARIANTS.
      calibration_images: for INT8, float32 [n, size, size, 3] pixels in
        [0, 255] from the train split (calibration_sample gives them).

    Returns:
      The .tflite file's bytes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {VARIANTS}.")
    if variant in NEEDS_CALIBRATION and calibration_images is None:
        raise ValueError(f"TFLite {variant} needs calibration images from the train split.")
    loaded = tf.saved_model.load(export.resolve_model_dir(model_dir))
    size = int(loaded.image_size.numpy())
    serve = loaded.signatures["serving_images"]

    # A fixed batch of one: what on-device apps run, and what GPU/NNAPI
    # delegates need (they reject dynamic shapes).
    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="images")])
    def classify_images(images):
        return {"probabilities": serve(images=images)["probabilities"]}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [classify_images.get_concrete_function()], loaded)
    if variant != FLOAT:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    if variant == INT8:
        converter.representative_dataset = lambda: (
            [np.asarray(image, np.float32)[np.newaxis]] for image in calibration_images)
        # Integer kernels only (a float op would fail the conversion, not fall
        # back), uint8 pixels in and probabilities out: what integer-only
        # accelerators take.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


def calibration_sample(split: pipeline.Split, image_size: int,
                       count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to ``count`` images spread evenly over a split (splits are often ordered
    by class): float32 [n, size, size, 3] pixels, decoded as for evaluation."""
    dataset = pipeline.make_dataset(spread_sample(split, count), image_size, 64,
                                    training=False, cache="none")
    images = np.concatenate([batch.numpy() for batch, _ in dataset.take(-(-count // 64))])
    return images[:count].astype(np.float32)


def spread_sample(split: pipeline.Split, count: int) -> pipeline.Split:
    """``count`` files of an image-file split, evenly spaced over it; records splits
    (and splits no larger) as they are, for the caller to take the first ``count``."""
    if not split.paths or split.count <= count:
        return split
    keep = np.linspace(0, split.count - 1, count).round().astype(int)
    return split.subset([int(k) for k in keep])


def interpreter(tflite_model: Union[str, bytes], num_threads: Optional[int] = None):
    """A TFLite interpreter of a .tflite path (local or gs://) or its bytes, allocated."""
    if isinstance(tflite_model, str):
        with tf.io.gfile.GFile(tflite_model, "rb") as f:
            tflite_model = f.read()
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that LiteRT (ai-edge-litert) replaces it on
        # devices; for checks next to TensorFlow it is the same runtime.
        warnings.simplefilter("ignore", UserWarning)
        result = tf.lite.Interpreter(model_content=tflite_model, num_threads=num_threads)
    result.allocate_tensors()
    return result


def classifier(tflite_model: Union[str, bytes], num_threads: Optional[int] = None):
    """A function of one float32 [size, size, 3] image (pixels in [0, 255]) to its
    float probabilities [classes], through the TFLite interpreter.

    Quantized inputs and outputs are converted with the tensors' own scale and
    zero point, as an app would.
    """
    runner = interpreter(tflite_model, num_threads).get_signature_runner()
    input_details = runner.get_input_details()["images"]
    output_details = runner.get_output_details()["probabilities"]

    def classify_one(image: np.ndarray) -> np.ndarray:
        pixels = np.asarray(image, np.float32)[np.newaxis]
        if input_details["dtype"] != np.float32:
            scale, zero_point = input_details["quantization"]
            info = np.iinfo(input_details["dtype"])
            pixels = np.clip(np.round(pixels / scale + zero_point), info.min, info.max)
        output = runner(images=pixels.astype(input_details["dtype"]))["probabilities"][0]
        if output_details["dtype"] != np.float32:
            scale, zero_point = output_details["quantization"]
            output = scale * (output.astype(np.float32) - zero_point)
        return output

    return classify_one


def classify(tflite_model: Union[str, bytes], images: np.ndarray) -> np.ndarray:
    """Runs a TFLite classifier over images one at a time.

    Args:
      tflite_model: a .tflite path (local or gs://) or its bytes.
      images: float32 [n, size, size, 3] pixels in [0, 255].

    Returns:
      probabilities [n, classes].
    """
    classify_one = classifier(tflite_model)
    return np.stack([classify_one(image) for image in images])


def export_tflite(model_dir: str, output_dir: str,
                  variants: Sequence[str] = VARIANTS,
                  calibration_split: Optional[pipeline.Split] = None,
                  calibration_images: int = CALIBRATION_IMAGES) -> Dict[str, str]:
    """Writes ``model_<variant>.tflite`` files and ``labels.txt`` to ``output_dir``.

    Each model is run once on a blank image before it is written; a model
    that gives non-finite probabilities raises instead of being written.

    Args:
      model_dir: exported SavedModel folder, local or gs://.
      output_dir: where the files go, local or gs://.
      variants: which of VARIANTS to write.
      calibration_split: the train split, for the variants that calibrate
        (int8); required when one is asked for.
      calibration_images: how many of its images to calibrate on.

    Returns:
      variant -> path of its .tflite file.
    """
    model_dir = export.resolve_model_dir(model_dir)
    class_names = export.read_class_names(model_dir)
    size = export.read_image_size(model_dir)
    calibration = None
    if any(v in NEEDS_CALIBRATION for v in variants):
        if calibration_split is None or not calibration_split.count:
            raise ValueError(f"TFLite {[v for v in variants if v in NEEDS_CALIBRATION]} "
                             "needs the train split's images to calibrate on.")
        calibration = calibration_sample(calibration_split, size, calibration_images)
    tf.io.gfile.makedirs(output_dir)
    paths = {}
    for variant in variants:
        content = convert(model_dir, variant, calibration)
        probabilities = classify(content, np.zeros([1, size, size, 3], np.float32))
        if probabilities.shape != (1, len(class_names)) or not np.isfinite(probabilities).all():
            raise ValueError(f"TFLite {variant} model of {model_dir} gives "
                             f"{probabilities.tolist()} on a blank image.")
        paths[variant] = tflite_path(output_dir, variant)
        with tf.io.gfile.GFile(paths[variant], "wb") as f:
            f.write(content)
        logging.info("TFLite %s model: %s (%.1f MB).", variant, paths[variant],
                     len(content) / 1e6)
    with tf.io.gfile.GFile(f"{output_dir.rstrip('/')}/{LABELS_FILE}", "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))
    thresholds = thresholds_lib.read(model_dir)
    if thresholds is not None:  # Multi-label: the app applies them to the probabilities.
        thresholds_lib.write(output_dir.rstrip("/"), class_names,
                             [thresholds[name] for name in class_names])
    return paths


# ------------------------------------------------------------ Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Exported model folder, local or gs://.", **fv)
    flags.DEFINE_string(
        "output_dir", None, "Folder for the .tflite files and labels.txt, local or gs://.", **fv)
    flags.DEFINE_multi_enum(
        "variant", None, VARIANTS,
        "TFLite variant(s) to write; repeat the flag for several. Default: all, "
        f"less {list(NEEDS_CALIBRATION)} without --data_dir.", **fv)
    flags.DEFINE_string(
        "data_dir", "",
        "The training data (any form training reads); its train split calibrates "
        f"{list(NEEDS_CALIBRATION)}.", **fv)
    flags.mark_flags_as_required(["model", "output_dir"], flag_values=flag_values)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    variants = fv.variant or [v for v in VARIANTS
                              if fv.data_dir or v not in NEEDS_CALIBRATION]
    calibrating = [v for v in variants if v in NEEDS_CALIBRATION]
    if calibrating and not fv.data_dir:
        raise app.UsageError(f"--variant={calibrating[0]} calibrates on training images: "
                             "pass --data_dir (the training data).")
    train = pipeline.describe(fv.data_dir).splits.get("train") if calibrating else None
    for variant, path in export_tflite(fv.model, fv.output_dir, variants, train).items():
        print(f"{variant}: {path}")


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
