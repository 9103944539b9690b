"""TFLite export: float and dynamic-range quantized models from the exported SavedModel.

The TFLite models are converted from the SavedModel's ``serving_images``
signature, so they hold the served model itself: the same weights and the
same preprocessing layers inside. Phones and edge devices decode images
themselves, so the image-bytes decoding stays out:

* input ``images``: float32 [1, size, size, 3], RGB pixels in [0, 255];
* output ``probabilities``: float32 [1, classes];
* ``labels.txt`` beside the models: class names, one a line, in index order
  (the layout TFLite image-classification apps read).

Variants: ``float`` (float32 weights, matches the SavedModel to float
rounding) and ``dynamic_range`` (int8 weights, about a quarter of the size,
float activations; needs no calibration data).

Command line, over any exported model::

    python -m trainer.tflite --model=job/model --output_dir=job/tflite
"""

import warnings
from typing import Dict, Sequence, Union

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from trainer import export

FLOAT = "float"
DYNAMIC_RANGE = "dynamic_range"
VARIANTS = (FLOAT, DYNAMIC_RANGE)
LABELS_FILE = "labels.txt"


def tflite_path(output_dir: str, variant: str) -> str:
    return f"{output_dir.rstrip('/')}/model_{variant}.tflite"


def convert(model_dir: str, variant: str = FLOAT) -> bytes:
    """Converts an exported model to a TFLite flatbuffer.

    Args:
      model_dir: exported SavedModel folder, local or gs://.
      variant: FLOAT or DYNAMIC_RANGE.

    Returns:
      The .tflite file's bytes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; use one of {VARIANTS}.")
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
    if variant == DYNAMIC_RANGE:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def classify(tflite_model: Union[str, bytes], images: np.ndarray) -> np.ndarray:
    """Runs a TFLite classifier over images one at a time.

    Args:
      tflite_model: a .tflite path (local or gs://) or its bytes.
      images: float32 [n, size, size, 3] pixels in [0, 255].

    Returns:
      probabilities [n, classes].
    """
    if isinstance(tflite_model, str):
        with tf.io.gfile.GFile(tflite_model, "rb") as f:
            tflite_model = f.read()
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that LiteRT (ai-edge-litert) replaces it on
        # devices; for checks next to TensorFlow it is the same runtime.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_content=tflite_model)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner()
    outputs = [runner(images=np.asarray(image, np.float32)[np.newaxis])["probabilities"][0]
               for image in images]
    return np.stack(outputs)


def export_tflite(model_dir: str, output_dir: str,
                  variants: Sequence[str] = VARIANTS) -> Dict[str, str]:
    """Writes ``model_<variant>.tflite`` files and ``labels.txt`` to ``output_dir``.

    Each model is run once on a blank image before it is written; a model
    that gives non-finite probabilities raises instead of being written.

    Returns:
      variant -> path of its .tflite file.
    """
    model_dir = export.resolve_model_dir(model_dir)
    tf.io.gfile.makedirs(output_dir)
    class_names = export.read_class_names(model_dir)
    size = export.read_image_size(model_dir)
    paths = {}
    for variant in variants:
        content = convert(model_dir, variant)
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
    return paths


# ------------------------------------------------------------ Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Exported model folder, local or gs://.", **fv)
    flags.DEFINE_string(
        "output_dir", None, "Folder for the .tflite files and labels.txt, local or gs://.", **fv)
    flags.DEFINE_multi_enum(
        "variant", list(VARIANTS), VARIANTS,
        "TFLite variant(s) to write; repeat the flag for several.", **fv)
    flags.mark_flags_as_required(["model", "output_dir"], flag_values=flag_values)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    for variant, path in export_tflite(fv.model, fv.output_dir, fv.variant).items():
        print(f"{variant}: {path}")


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
