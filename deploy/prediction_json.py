"""The JSON that Vertex AI's TensorFlow prediction containers take and return.

The prebuilt TensorFlow containers (``tf2-cpu.2-15``, ``tf2-gpu.2-15``) run
TensorFlow Serving, and an online prediction's body goes to its REST
``:predict`` method. This module applies the rules that TensorFlow Serving's
REST API documents (and ``tensorflow_serving/util/json_tensor.cc`` implements)
for the "row" format, so that a body can be checked against the exported
model here, before it is deployed:

* ``{"instances": [...]}``: each instance is either an object with one key per
  signature input (exactly those keys), or, when the signature has one input,
  the bare value of that input. The instances are stacked along a new first
  (batch) dimension.
* A value ``{"b64": "<base64>"}`` (an object with that single string key) is
  decoded to bytes for a ``DT_STRING`` input. Our ``serving_default`` takes
  ``image_bytes`` (the ``_bytes`` suffix is what Vertex AI's docs ask of
  binary inputs), so ``{"instances": [{"image_bytes": {"b64": ...}}]}`` works
  and so does ``{"instances": [{"b64": ...}]}``.
* The response is ``{"predictions": [...]}``, one object per instance keyed by
  output name (one bare value when the signature has one output). A string
  output is written as a JSON string, or as ``{"b64": ...}`` when its name
  ends in ``_bytes``.

Batch prediction from a file list (``instancesFormat: file-list``) sends each
listed file as ``{"b64": <base64 of its content>}`` (Vertex AI's
``BatchPredictionJob.InstanceConfig`` documentation):
``file_list_instance`` builds that instance.

Command line: ``python -m deploy.serve local --model_dir=job/model --request=body.json``.
"""

import base64
import json
from typing import Any, Dict, List, Mapping

import numpy as np

BASE64_KEY = "b64"
BYTES_SUFFIX = "_bytes"
DEFAULT_SIGNATURE = "serving_default"


class RequestError(ValueError):
    """A request body TensorFlow Serving would reject (it answers HTTP 400)."""


# ------------------------------------------------------------------ Requests


def image_instance(image: bytes, input_name: str = "image_bytes") -> Dict[str, Any]:
    """One online-prediction instance of an encoded image: ``{input: {"b64": ...}}``."""
    return {input_name: {BASE64_KEY: base64.b64encode(image).decode("ascii")}}


def file_list_instance(content: bytes) -> Dict[str, str]:
    """The instance batch prediction sends for one file of a file list."""
    return {BASE64_KEY: base64.b64encode(content).decode("ascii")}


def read_file_list_instances(list_path: str) -> List[Dict[str, str]]:
    """What batch prediction sends for a file list: one instance per listed path.

    Args:
      list_path: a text file (local or gs://) with one image path per line.
    """
    import tensorflow as tf

    with tf.io.gfile.GFile(list_path) as f:
        paths = [line.strip() for line in f if line.strip()]
    instances = []
    for path in paths:
        with tf.io.gfile.GFile(path, "rb") as f:
            instances.append(file_list_instance(f.read()))
    return instances


def is_base64_object(value: Any) -> bool:
    """True for ``{"b64": "<string>"}`` and nothing else."""
    return (isinstance(value, dict) and len(value) == 1
            and isinstance(value.get(BASE64_KEY), str))


def instances_to_inputs(body: Mapping[str, Any],
                        input_dtypes: Mapping[str, str]) -> Dict[str, np.ndarray]:
    """The signature inputs that TensorFlow Serving builds from a row-format body.

    Args:
      body: the parsed JSON body, ``{"instances": [...]}``.
      input_dtypes: input name -> dtype name ("string", "float32", ...), as
        the signature declares them.

    Returns:
      Input name -> array with the instances stacked on axis 0.

    Raises:
      RequestError: the body breaks a rule TensorFlow Serving enforces.
    """
    if "inputs" in body:
        raise RequestError("Use the row format ({\"instances\": [...]}); the columnar "
                           "\"inputs\" format is not what Vertex AI batch prediction sends.")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError("Missing 'instances' key, or it is not a non-empty list.")
    names = sorted(input_dtypes)
    named = _is_named(instances[0])
    if not named and len(names) > 1:
        raise RequestError(f"instances is a plain list, but the signature takes several "
                           f"inputs: {names}.")
    columns: Dict[str, list] = {name: [] for name in names}
    for i, instance in enumerate(instances):
        if named != _is_named(instance):
            raise RequestError(f"Instance {i}: every instance must be an object of named "
                               "inputs, or every one a bare value; not a mix.")
        items = instance if named else {names[0]: instance}
        if sorted(items) != names:
            raise RequestError(f"Instance {i}: has keys {sorted(items)}; the signature "
                               f"takes exactly {names}.")
        for name, value in items.items():
            columns[name].append(_decode(value, input_dtypes[name], f"instance {i}: {name}"))
    return {name: _stack(values, input_dtypes[name], name) for name, values in columns.items()}


def _is_named(instance: Any) -> bool:
    return isinstance(instance, dict) and not is_base64_object(instance)


def _decode(value: Any, dtype: str, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, dtype, where) for v in value]
    if isinstance(value, dict):
        if dtype != "string" or not is_base64_object(value):
            raise RequestError(f"{where}: an object is only allowed as {{\"b64\": ...}} "
                               f"for a string input; got {json.dumps(value)[:80]}.")
        try:
            return base64.b64decode(value[BASE64_KEY], validate=True)
        except ValueError:
            raise RequestError(f"{where}: unable to base64 decode.") from None
    if dtype == "string" and isinstance(value, str):
        return value.encode("utf-8")
    return value


def _stack(values: list, dtype: str, name: str) -> np.ndarray:
    numpy_dtype = object if dtype == "string" else np.dtype(dtype)
    try:
        array = np.array(values, dtype=numpy_dtype)
    except (ValueError, TypeError) as e:
        raise RequestError(f"Input {name}: instances of different shapes or types ({e}).") from None
    return array


# ----------------------------------------------------------------- Responses


def outputs_to_predictions(outputs: Mapping[str, Any]) -> Dict[str, list]:
    """The row-format response body TensorFlow Serving writes for these outputs."""
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    batch_sizes = {array.shape[0] if array.ndim else 0 for array in arrays.values()}
    if len(batch_sizes) != 1 or 0 in batch_sizes:
        raise RequestError(f"Outputs have inconsistent batch sizes: "
                           f"{ {n: a.shape for n, a in arrays.items()} }.")
    rows = []
    for i in range(batch_sizes.pop()):
        row = {name: _to_json(array[i], name.endswith(BYTES_SUFFIX))
               for name, array in sorted(arrays.items())}
        rows.append(row if len(row) > 1 else next(iter(row.values())))
    return {"predictions": rows}


def _to_json(value: Any, as_bytes: bool) -> Any:
    if isinstance(value, np.ndarray) and value.ndim:
        return [_to_json(v, as_bytes) for v in value]
    item = value.item() if isinstance(value, (np.ndarray, np.generic)) else value
    if isinstance(item, bytes):
        return file_list_instance(item) if as_bytes else item.decode("utf-8")
    return item


# --------------------------------------------------------------- Prediction


def predict(model: Any, body: Mapping[str, Any]) -> Dict[str, list]:
    """Runs a request body through an exported SavedModel as the container would.

    Args:
      model: the SavedModel folder (what the Model's artifactUri names), or
        the SavedModel already loaded from it.
      body: the parsed request body.

    Returns:
      The response body.
    """
    import tensorflow as tf

    signature_name = body.get("signature_name", DEFAULT_SIGNATURE)
    loaded = tf.saved_model.load(model) if isinstance(model, str) else model
    if signature_name not in loaded.signatures:
        raise RequestError(f"No signature {signature_name!r}; the model has "
                           f"{sorted(loaded.signatures)}.")
    signature = loaded.signatures[signature_name]
    specs = signature.structured_input_signature[1]
    inputs = instances_to_inputs(body, {name: spec.dtype.name for name, spec in specs.items()})
    outputs = signature(**{name: tf.constant(value, dtype=specs[name].dtype)
                           for name, value in inputs.items()})
    return outputs_to_predictions({name: t.numpy() for name, t in outputs.items()})
