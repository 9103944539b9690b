"""Prediction command over an exported model: label and probability per image.

::

    python -m trainer.predict --model=job/model --images='photos/*.jpg' [--top_k=3] [--json]

``--images`` takes files, folders (their images, recursively) and globs,
local or gs://, and may be repeated. The model's ``serving_default``
signature (encoded image bytes) does the work, so images are decoded and
resized exactly as the deployed model does it.

An image that cannot be read or decoded, or whose header gives more than
``--max_image_pixels`` pixels (checked before the model decodes it), gets
its own error and the others
still run; the command exits 1 only when no image was predicted.

Output: a line per image (errors on stderr), or with ``--json`` one JSON
object per line on stdout (JSON Lines), either
``{"path", "label", "score", "top_k": [{"label", "probability"}, ...]}`` or
``{"path", "error"}``. A multi-label model's results add ``labels``: every
class whose score is at or above its threshold, highest first (possibly
none), as ``[{"label", "score"}, ...]``; its line lists them
(``path: red (0.934), blue (0.712)``, or ``path: no label``).
"""

import json
import sys
from typing import Dict, Iterator, List, Sequence, Union

import tensorflow as tf
from absl import app
from absl import flags

from trainer import export
from trainer.data import images
from trainer.data import pipeline

BATCH_SIZE = 32


def list_images(patterns: Sequence[str]) -> List[str]:
    """Expands files, folders and globs into image paths, in a stable order.

    A folder contributes its image files (by extension, recursively); a glob
    or file contributes every match, images or not, so that a wrong file gets
    an error rather than silent neglect. A pattern that matches nothing is
    kept as it is, so that it too is reported.
    """
    paths = []
    for pattern in patterns:
        if tf.io.gfile.isdir(pattern):
            paths += _images_under(pattern)
        else:
            paths += sorted(tf.io.gfile.glob(pattern)) or [pattern]
    return paths


def _images_under(folder: str) -> List[str]:
    found = []
    for directory, _, files in tf.io.gfile.walk(folder):
        found += [f"{directory.rstrip('/')}/{name}" for name in files
                  if name.lower().endswith(pipeline.IMAGE_EXTENSIONS)]
    return sorted(found)


def predict_files(model_dir: str, paths: Sequence[str], top_k: int = 1,
                  batch_size: int = BATCH_SIZE,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Iterator[Dict]:
    """Yields one result per path, in order: a prediction or an error.

    Args:
      model_dir: exported model folder, local or gs://.
      paths: image files, local or gs://.
      top_k: how many of the most probable classes each result lists.
      batch_size: images per call of the model.
      max_pixels: an image whose header gives more pixels gets an error and
        is never decoded (a decompression bomb).
    """
    serve = tf.saved_model.load(export.resolve_model_dir(model_dir)).signatures["serving_default"]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        contents = {path: _read(path, max_pixels) for path in chunk}
        readable = [p for p in chunk if isinstance(contents[p], bytes)]
        outputs = dict(zip(readable, _predict_bytes(serve, [contents[p] for p in readable])))
        for path in chunk:
            outcome = outputs.get(path, contents[path])
            if isinstance(outcome, str):
                yield {"path": path, "error": outcome}
            else:
                yield {"path": path, **_top_classes(outcome, top_k)}


def _read(path: str, max_pixels: int) -> Union[bytes, str]:
    """The file's bytes, or an error message (unreadable, or too large to decode)."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.OpError as e:
        return f"cannot read the file: {e.message}"
    # The serving model would decode it in full: check the header's size first.
    return images.oversize_reason(data, max_pixels) or data


def _predict_bytes(serve, contents: List[bytes]) -> List[Union[Dict, str]]:
    """Per image: the model's outputs, or an error message for an undecodable one.

    The whole batch runs at once; if any image fails to decode the batch
    fails, and then each image runs alone to find which.
    """
    if not contents:
        return []
    try:
        outputs = serve(image_bytes=tf.constant(contents))
    except tf.errors.InvalidArgumentError as e:
        if len(contents) == 1:
            return [f"not a decodable image (JPEG, PNG, GIF or BMP): {e.message.splitlines()[0]}"]
        return [result for content in contents for result in _predict_bytes(serve, [content])]
    probabilities = outputs["probabilities"].numpy()
    class_names = [name.decode() for name in outputs["class_names"].numpy()[0]]
    results = [{"probabilities": row, "class_names": class_names} for row in probabilities]
    if "labels" in outputs:  # A multi-label model: the classes above their thresholds.
        for result, labels in zip(results, outputs["labels"].numpy()):
            result["labels"] = [name.decode() for name in labels if name]
    return results


def _top_classes(outputs: Dict, top_k: int) -> Dict:
    probabilities, class_names = outputs["probabilities"], outputs["class_names"]
    order = probabilities.argsort()[::-1][:max(1, top_k)]
    result = {
        "label": class_names[order[0]],
        "score": float(probabilities[order[0]]),
        "top_k": [{"label": class_names[i], "probability": float(probabilities[i])}
                  for i in order],
    }
    if "labels" in outputs:
        result["labels"] = [{"label": name,
                             "score": float(probabilities[class_names.index(name)])}
                            for name in outputs["labels"]]
    return result


def format_result(result: Dict) -> str:
    """One human-readable line: ``path: label (0.934), then other (0.051)``."""
    if "error" in result:
        return f"{result['path']}: ERROR {result['error']}"
    if "labels" in result:  # Multi-label: every label above its threshold.
        shown = [f"{c['label']} ({c['score']:.3f})" for c in result["labels"]]
        return f"{result['path']}: " + (", ".join(shown) or "no label")
    ranked = [f"{c['label']} ({c['probability']:.3f})" for c in result["top_k"]]
    return f"{result['path']}: " + ", then ".join(ranked)


# ------------------------------------------------------------ Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Exported model folder, local or gs://.", **fv)
    flags.DEFINE_multi_string(
        "images", None,
        "Image file, folder (its images, recursively) or glob, local or "
        "gs://; repeat the flag for several.", **fv)
    flags.DEFINE_integer("top_k", 1, "How many of the most probable classes to show per image.",
                         **fv)
    flags.DEFINE_bool("json", False, "Print one JSON object per image per line (JSON Lines).",
                      **fv)
    flags.DEFINE_integer("batch_size", BATCH_SIZE, "Images per call of the model.", **fv)
    flags.DEFINE_integer(
        "max_image_pixels", images.DEFAULT_MAX_PIXELS,
        "Largest image predicted, in decoded pixels (from the header, before "
        "decoding); a larger one gets an error. Default: Pillow's MAX_IMAGE_PIXELS.", **fv)
    flags.mark_flags_as_required(["model", "images"], flag_values=flag_values)


def run(flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Predicts as the parsed flags say and prints the results; returns the exit code."""
    if flag_values.top_k < 1 or flag_values.batch_size < 1:
        raise app.UsageError("--top_k and --batch_size must be at least 1.")
    paths = list_images(flag_values.images)
    succeeded = 0
    for result in predict_files(flag_values.model, paths, flag_values.top_k,
                                flag_values.batch_size, flag_values.max_image_pixels):
        succeeded += "error" not in result
        if flag_values.json:
            print(json.dumps(result), flush=True)
        else:
            print(format_result(result), file=sys.stderr if "error" in result else sys.stdout,
                  flush=True)
    failed = len(paths) - succeeded
    print(f"Predicted {succeeded} of {len(paths)} images"
          + (f"; {failed} failed." if failed else "."), file=sys.stderr)
    return 0 if succeeded else 1


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    return run()


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
