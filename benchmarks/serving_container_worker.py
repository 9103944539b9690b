"""Runs request bodies through exported models under another TensorFlow, as TF Serving does.

Started by benchmarks/serving_container.py with the Python of an environment
that has the serving container's TensorFlow (2.15 for tf2-cpu.2-15). It loads
each SavedModel with the TF1 session loader, the path TensorFlow Serving's
C++ ``LoadSavedModel`` takes (MetaGraphDef + variables into a Session), looks
up the ``serving_default`` SignatureDef, feeds its input tensor by name with
the inputs TensorFlow Serving builds from the JSON body
(deploy/prediction_json.py), fetches every output tensor, and writes the
response bodies as JSON.

    python benchmarks/serving_container_worker.py JOBS.json OUT.json

JOBS.json: {"body": <request body>, "models": [<SavedModel folder>, ...]}.
Imports only TensorFlow, NumPy and deploy.prediction_json (no trainer code).
"""

import json
import sys
import time

import tensorflow as tf

from deploy import prediction_json


def _dtype_name(enum_value) -> str:
    return tf.dtypes.as_dtype(enum_value).name


def serve(model_dir: str, body: dict) -> dict:
    start = time.perf_counter()
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], model_dir)
        signature = meta_graph.signature_def[prediction_json.DEFAULT_SIGNATURE]
        inputs = prediction_json.instances_to_inputs(
            body, {name: _dtype_name(info.dtype) for name, info in signature.inputs.items()})
        load_seconds = time.perf_counter() - start
        feed = {signature.inputs[name].name: value for name, value in inputs.items()}
        fetch = {name: info.name for name, info in signature.outputs.items()}
        outputs = session.run(fetch, feed)
    return {"response": prediction_json.outputs_to_predictions(outputs),
            "method_name": signature.method_name, "load_seconds": load_seconds}


def main(jobs_path: str, out_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {"tensorflow": tf.__version__,
               "models": {model_dir: serve(model_dir, jobs["body"])
                          for model_dir in jobs["models"]}}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
