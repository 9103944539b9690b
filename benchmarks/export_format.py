"""What saving the Keras model object into the SavedModel costs: save, size, load.

Run (about 2 minutes on 2 cores):

    python -m benchmarks.export_format \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

The export (trainer/export.py) saves the classifier's variables and its two
serving signatures. It used to track the Keras model itself, and
``tf.saved_model.save`` then serializes it as a Keras object: every layer's
own traced call functions go into the SavedModel too. This benchmark exports
one MobileNetV2 classifier (224 px) both ways, in alternating rounds, each
round in a fresh process (tracing caches are per process), and measures:
seconds and CPU-seconds to save, the files' size, seconds to load and give
the first answer (a serving replica's cold start), and the largest
difference between the two sides' probabilities on the same images (a
speed-independent value: it must be 0). Results go to
benchmarks/results/export_format.{json,md}.

``--smoke`` runs the same code at toy size in seconds (the small demo_cnn
backbone at 32 px, random weights, one round); the test suite runs it (tests/test_benchmarks.py). Its figures
mean nothing.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from trainer import export
from trainer import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of both sides.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where export_format.json and .md are written.")
flags.DEFINE_bool("smoke", False, "Toy size in seconds (demo_cnn, 32 px, random weights, 1 round): "
                  "checks that the benchmark runs; its figures mean nothing.")
flags.DEFINE_string("worker", "", "Internal: one export, JSON of _measure's arguments.")

SIDES = ("variables", "keras_object")  # Ours; the export as it was.
SIZE, SMOKE_SIZE = 224, 32
CLASSES = ("cat", "dog")


class KerasObjectServing(export.Serving):
    """The export as it was: the Keras model tracked, so saved as a Keras object."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.model = model  # Tracked: tf.saved_model.save serializes it with its layers.


def _measure(side: str, weights, size: int, backbone: str) -> dict:
    """One export of one side, in this process: its times, size and outputs."""
    tf.keras.utils.set_random_seed(0)  # Random weights (smoke) alike on both sides.
    model = model_lib.create_model(backbone, len(CLASSES), size, 0.2, weights=weights,
                                   augment=False, seed=0)
    serving = (KerasObjectServing if side == "keras_object" else export.Serving)(
        model, CLASSES, size)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, [4, size, size, 3]),
                         tf.float32)
    with tempfile.TemporaryDirectory() as folder:
        cpu, start = os.times(), time.perf_counter()
        export.save_serving(serving, folder)
        save_seconds, save_cpu = time.perf_counter() - start, _cpu_since(cpu)
        size_bytes = sum(os.path.getsize(os.path.join(d, n))
                         for d, _, names in os.walk(folder) for n in names)
        cpu, start = os.times(), time.perf_counter()
        outputs = tf.saved_model.load(folder).signatures["serving_images"](images=images)
        probabilities = outputs["probabilities"].numpy()
        load_seconds, load_cpu = time.perf_counter() - start, _cpu_since(cpu)
    return {"side": side, "save_seconds": save_seconds, "save_cpu_seconds": save_cpu,
            "size_mb": size_bytes / 1e6, "load_and_first_call_seconds": load_seconds,
            "load_and_first_call_cpu_seconds": load_cpu,
            "probabilities": probabilities.tolist()}


def _cpu_since(before) -> float:
    now = os.times()
    return now.user + now.system - before.user - before.system


def _run_worker(spec: dict) -> dict:
    """One measurement in a fresh process (no trace cached from an earlier export)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.export_format",
                          f"--worker={json.dumps(spec)}"], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"export_format worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.worker:
        spec = json.loads(FLAGS.worker)
        print(json.dumps(_measure(**spec)))
        return
    if not (FLAGS.weights or FLAGS.smoke):
        raise app.UsageError("--weights is required (or --smoke).")
    size = SMOKE_SIZE if FLAGS.smoke else SIZE
    backbone = "demo_cnn" if FLAGS.smoke else "mobilenet_v2"
    weights = None if FLAGS.smoke else os.path.abspath(FLAGS.weights)
    rounds = []
    for number in range(1 if FLAGS.smoke else FLAGS.rounds):
        row = {side: _run_worker({"side": side, "weights": weights, "size": size,
                                  "backbone": backbone})
               for side in SIDES}
        difference = float(np.abs(np.array(row["variables"].pop("probabilities"))
                                  - np.array(row["keras_object"].pop("probabilities"))).max())
        rounds.append({"round": number + 1, **row, "max_probability_difference": difference})
        print(json.dumps(rounds[-1]), flush=True)
    summary = _summary(rounds)
    print(json.dumps(summary, indent=2))
    _write(rounds, summary, "python -m benchmarks.export_format " + " ".join(sys.argv[1:]),
           size, backbone)


KEYS = ("save_seconds", "save_cpu_seconds", "size_mb", "load_and_first_call_seconds",
        "load_and_first_call_cpu_seconds")


def _summary(rounds) -> dict:
    """Per measure: each side's median and the ratio of ours to the old export's."""
    summary = {"max_probability_difference": max(r["max_probability_difference"]
                                                 for r in rounds)}
    for key in KEYS:
        medians = {side: statistics.median(r[side][key] for r in rounds) for side in SIDES}
        summary[key] = {**medians, "ratio": medians["variables"] / medians["keras_object"]}
    return summary


def _write(rounds, summary, command, size, backbone):
    lines = ["# Export: the classifier's variables, or the Keras model object", "", "```",
             command, "```", "",
             f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, {backbone} at {size} px, "
             f"2 classes; each side of each of {len(rounds)} alternating rounds in a fresh "
             "process. Medians:", "",
             "| measure | variables (ours) | Keras object (before) | ratio |",
             "|---|---|---|---|"]
    for key in KEYS:
        row = summary[key]
        lines.append(f"| {key} | {row['variables']:.2f} | {row['keras_object']:.2f} | "
                     f"{row['ratio']:.2f} |")
    lines += ["", "Largest difference between the sides' probabilities on the same 4 images: "
              f"{summary['max_probability_difference']:.1e}.", ""]
    report.write(FLAGS.out_dir, "export_format", command, rounds, summary, lines)


if __name__ == "__main__":
    app.run(main)
