"""Does the prebuilt prediction container's TensorFlow load and run what the trainer exports?

Vertex AI's newest prebuilt TensorFlow prediction images are
``tf2-cpu.2-15`` / ``tf2-gpu.2-15`` (TensorFlow Serving 2.15), while the
trainer exports with TensorFlow 2.21, and TensorFlow promises backward, not
forward, compatibility of SavedModels. This check exports a model of every
backbone in ``trainer.model.BACKBONES`` with ``trainer.export.export_model``
(the trainer's own export), answers one online request body of real images
with it under TensorFlow 2.21 (deploy/prediction_json.py, eager), and again
under the serving TensorFlow in another environment
(benchmarks/serving_container_worker.py: TF1 session loader, as TF Serving's
C++ loader), and compares the two responses.

Run (about 3 minutes on 2 cores; the environment is made once):

    python3.11 -m venv /tmp/tf215 && /tmp/tf215/bin/pip install tensorflow-cpu==2.15.1
    python -m benchmarks.serving_container --serving_python=/tmp/tf215/bin/python \
        --images='../shared/data/cats_and_dogs_filtered/validation/*/cat.200[0-3].jpg'

``--smoke`` runs the same code at toy size (demo_cnn only, two generated
images, the serving side under this same TensorFlow) to check that the check
still works. It takes two TensorFlow start-ups (about 50 s on 2 busy cores),
so the suite does not run it; tests/test_serving_contract.py runs the
worker's session-loader path in process instead.

Results go to benchmarks/results/serving_container.{json,md}. The backbones
have random weights (the ops, not the weights, decide whether a model loads);
each model is exported at its backbone's native size (224 px for ImageNet
backbones, 64 for demo_cnn), two classes (one logit) for MobileNetV2 and
three (softmax) for the rest.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from deploy import prediction_json
from trainer import export
from trainer import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("serving_python", None,
                    "Python of an environment with the serving TensorFlow (tensorflow-cpu==2.15.1).")
flags.DEFINE_string("images", None, "Glob of JPEG images for the request body.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where serving_container.json and .md are written.")
flags.DEFINE_bool("smoke", False,
                  "Toy size in seconds (demo_cnn, two generated images, served by this "
                  "Python's TensorFlow): checks that the check runs.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "benchmarks", "serving_container_worker.py")
# Probabilities of two runtimes on the same graph agree to float32 rounding.
TOLERANCE = 1e-5


def _export_all(root: str, backbones) -> dict:
    """Backbone -> exported model folder, one per given backbone."""
    dirs = {}
    for name in backbones:
        backbone = model_lib.BACKBONES[name]
        size = backbone.native_size or 64
        classes = ["cat", "dog"] if name == "mobilenet_v2" else ["a", "b", "c"]
        model = model_lib.create_model(name, len(classes), size, 0.2, weights=None,
                                       augment=False, seed=0)
        dirs[name] = export.export_model(model, classes, size, os.path.join(root, name))
        print(f"exported {name} ({size} px, {len(classes)} classes)", flush=True)
    return dirs


def _compare(expected: dict, got: dict) -> dict:
    e, g = expected["predictions"], got["predictions"]
    difference = max(float(np.abs(np.subtract(a["probabilities"], b["probabilities"])).max())
                     for a, b in zip(e, g))
    return {"instances": len(e), "labels_equal": [a["label"] for a in e] == [b["label"] for b in g],
            "same_keys": all(sorted(a) == sorted(b) for a, b in zip(e, g)),
            "max_probability_difference": difference,
            "agrees": difference <= TOLERANCE and [a["label"] for a in e] == [b["label"] for b in g]}


def main(argv):
    del argv
    if FLAGS.smoke:
        serving_python, backbones = sys.executable, ["demo_cnn"]
    elif not FLAGS.serving_python or not FLAGS.images:
        raise app.UsageError("--serving_python and --images are required (or --smoke).")
    else:
        serving_python, backbones = FLAGS.serving_python, list(model_lib.BACKBONES)
    with tempfile.TemporaryDirectory() as root:
        pattern = _smoke_images(root) if FLAGS.smoke else FLAGS.images
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise app.UsageError(f"--images={pattern} matches no file.")
        body = {"instances": [prediction_json.image_instance(_read(p)) for p in paths]}
        dirs = _export_all(root, backbones)
        expected = {name: prediction_json.predict(d, body) for name, d in dirs.items()}
        jobs, out = os.path.join(root, "jobs.json"), os.path.join(root, "out.json")
        with open(jobs, "w") as f:
            json.dump({"body": body, "models": list(dirs.values())}, f)
        subprocess.run([serving_python, WORKER, jobs, out], check=True,
                       env={**os.environ, "PYTHONPATH": REPO})
        with open(out) as f:
            served = json.load(f)
    rows = []
    for name, model_dir in dirs.items():
        result = served["models"][model_dir]
        rows.append({"backbone": name, "method_name": result["method_name"],
                     **_compare(expected[name], result["response"])})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"exporting_tensorflow": tf.__version__, "serving_tensorflow": served["tensorflow"],
               "images": [p if FLAGS.smoke else os.path.relpath(p, REPO) for p in paths],
               "tolerance": TOLERANCE, "all_agree": all(r["agrees"] for r in rows)}
    command = "python -m benchmarks.serving_container " + " ".join(sys.argv[1:])
    _write(rows, summary, command)
    print(json.dumps(summary, indent=2))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _smoke_images(root: str) -> str:
    """Two generated JPEGs; returns their glob."""
    from trainer.data import demo as demo_data

    demo_data.write_dataset(os.path.join(root, "images"), ("circle", "square"), {"test": 1},
                            size=32, seed=0)
    return os.path.join(root, "images", "test", "*", "*.jpg")


def _write(rows, summary, command):
    lines = ["# Serving container check: TensorFlow 2.21 exports under the serving TensorFlow",
             "", "```", command, "```", "",
             f"Exported with TensorFlow {summary['exporting_tensorflow']}; served with "
             f"TensorFlow {summary['serving_tensorflow']} (the runtime of Vertex AI's "
             "`tf2-cpu.2-15` / `tf2-gpu.2-15` prediction images) through the TF1 session "
             "loader that TensorFlow Serving's C++ loader mirrors. One online request body of "
             f"{len(summary['images'])} images (`{{\"image_bytes\": {{\"b64\": ...}}}}`), "
             "turned into inputs by TensorFlow Serving's REST rules (deploy/prediction_json.py).",
             "", "| backbone | method | instances | same labels | same output keys | "
             "max probability difference | agrees |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | `{r['method_name']}` | {r['instances']} | "
                     f"{r['labels_equal']} | {r['same_keys']} | "
                     f"{r['max_probability_difference']:.1e} | {r['agrees']} |")
    lines += ["", f"All agree (probabilities within {summary['tolerance']:g}, same labels): "
              f"**{summary['all_agree']}**.", ""]
    report.write(FLAGS.out_dir, "serving_container", command, rows, summary, lines)


if __name__ == "__main__":
    app.run(main)
