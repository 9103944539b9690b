"""ONNX export of the SavedModel through tf2onnx, run with onnxruntime.

The graph converted is the SavedModel's ``serving_images`` signature, as for
TFLite, so the ONNX model holds the preprocessing too:

* input ``images``: float32 [batch, size, size, 3], RGB pixels in [0, 255];
* output ``probabilities``: float32 [batch, classes];
* the class names (JSON list, index order) and the input side are in the
  model's metadata (``metadata_props`` ``class_names`` and ``image_size``),
  which onnxruntime reads as ``session.get_modelmeta().custom_metadata_map``.

tf2onnx and onnxruntime are an optional extra (``pip install
'transfer-trainer[onnx]'``). Command line, over any exported model::

    python -m trainer.onnx_export --model=job/model --output_dir=job/onnx
"""

import json
import os
import tempfile
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from trainer import export

ONNX_FILE = "model.onnx"
# Opset 17 (2022) runs on every maintained ONNX runtime; tf2onnx 1.17 and
# onnxruntime 1.32 support later ones too.
OPSET = 17
SIGNATURE = "serving_images"
EXTRA = "pip install 'transfer-trainer[onnx]' (tf2onnx and onnxruntime)"


def check_installed() -> None:
    """Raises ImportError naming the extra when tf2onnx or onnxruntime is missing."""
    import importlib.util
    missing = [name for name in ("tf2onnx", "onnxruntime")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {missing}: {EXTRA}.")


def convert(model_dir: str, path: str, opset: int = OPSET) -> str:
    """Converts an exported model to ONNX at ``path`` (local or gs://); returns ``path``."""
    check_installed()
    import onnx
    from tf2onnx import convert as tf2onnx_convert
    from tf2onnx import tf_loader

    # The route of tf2onnx's own command line (--saved-model --signature_def),
    # which freezes the signature's variables; the graph's output is cut to
    # the probabilities.
    graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
        model_dir, None, None, signatures=[SIGNATURE], return_tensors_to_rename=True)
    outputs = [name for name in outputs if renames.get(name) == "probabilities"]
    proto, _ = tf2onnx_convert.from_graph_def(
        graph_def, input_names=inputs, output_names=outputs, opset=opset,
        tensors_to_rename=renames)
    size = export.read_image_size(model_dir)
    onnx.helper.set_model_props(proto, {
        "class_names": json.dumps(export.read_class_names(model_dir)),
        "image_size": str(size)})
    onnx.checker.check_model(proto)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def session(path: str, num_threads: Optional[int] = None):
    """An onnxruntime CPU session of a .onnx file, local or gs://."""
    check_installed()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    with tf.io.gfile.GFile(path, "rb") as f:
        content = f.read()
    return onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])


def classify(path: str, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities [n, classes] of float32 images [n, size, size, 3] (pixels in
    [0, 255]) by onnxruntime."""
    runner = session(path)
    return np.concatenate([
        runner.run(["probabilities"], {"images": np.asarray(images[k:k + batch_size],
                                                            np.float32)})[0]
        for k in range(0, len(images), batch_size)])


def read_metadata(path: str) -> Dict:
    """The class names and input side an ONNX export carries."""
    meta = session(path).get_modelmeta().custom_metadata_map
    return {"class_names": json.loads(meta["class_names"]),
            "image_size": int(meta["image_size"])}


def export_onnx(model_dir: str, output_dir: str) -> str:
    """Writes ``<output_dir>/model.onnx``, checked on a blank image first; returns its path.

    The file is converted to a local temporary folder and run once there; a
    model giving non-finite or misshapen probabilities raises instead of
    being written.
    """
    model_dir = export.resolve_model_dir(model_dir)
    size = export.read_image_size(model_dir)
    num_classes = len(export.read_class_names(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        local = convert(model_dir, os.path.join(tmp, ONNX_FILE))
        probabilities = classify(local, np.zeros([1, size, size, 3], np.float32))
        if probabilities.shape != (1, num_classes) or not np.isfinite(probabilities).all():
            raise ValueError(f"ONNX model of {model_dir} gives {probabilities.tolist()} "
                             "on a blank image.")
        tf.io.gfile.makedirs(output_dir)
        path = f"{output_dir.rstrip('/')}/{ONNX_FILE}"
        tf.io.gfile.copy(local, path, overwrite=True)
    logging.info("ONNX model: %s (%.1f MB).", path, tf.io.gfile.stat(path).length / 1e6)
    return path


# ------------------------------------------------------------ Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Exported model folder, local or gs://.", **fv)
    flags.DEFINE_string("output_dir", None,
                        f"Folder for {ONNX_FILE}, local or gs://.", **fv)
    flags.mark_flags_as_required(["model", "output_dir"], flag_values=flag_values)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        check_installed()
    except ImportError as e:
        raise app.UsageError(str(e)) from None
    print(export_onnx(flags.FLAGS.model, flags.FLAGS.output_dir))


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
