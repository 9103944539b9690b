"""The frozen backbone's forward pass, with and without BatchNorm folded.

Run (about 1 minute on 2 cores):

    python -m benchmarks.frozen_forward \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Measures images/s of MobileNetV2 (160 px, batch 64, uint8 images in memory,
pooled features out, inference mode) as the feature caches run it: (a) the
model's own backbone, (b) ``folding.fold_batch_norm``'s copy, in alternating
rounds of the same run. Also reports process CPU-seconds per image, which
this machine's slow spells (when it gets about one core) do not change, and
the largest difference between the two sides' features. Results go to
benchmarks/results/frozen_forward.{json,md}.

``--smoke`` runs the same code at toy size in seconds (32 px, batch 8,
random weights, one short round) to check that the benchmark still works;
the test suite runs it (tests/test_benchmarks.py). Its figures mean nothing.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from trainer import features
from trainer import folding
from trainer import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds of (a) and (b).")
flags.DEFINE_float("seconds", 4.0, "Length of one measurement.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where frozen_forward.json and .md are written.")
flags.DEFINE_bool("smoke", False,
                  "Toy size in seconds (32 px, batch 8, random weights, 1 round of 0.2 s): "
                  "checks that the benchmark runs; its figures mean nothing.")

BATCH = 64
SIZE = 160
SMOKE = dict(size=32, batch=8, rounds=1, seconds=0.2)


def _measure(forward, images, seconds: float) -> dict:
    """images/s and CPU-seconds per image over about ``seconds``."""
    forward(images).numpy()  # Warm up: the first call builds the kernels.
    batch = int(images.shape[0])
    count, cpu, start = 0, os.times(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(images).numpy()
        count += batch
    wall, end = time.perf_counter() - start, os.times()
    cpu_seconds = end.user + end.system - cpu.user - cpu.system
    return {"images_per_second": count / wall, "cpu_ms_per_image": 1e3 * cpu_seconds / count}


def main(argv):
    del argv
    if not (FLAGS.weights or FLAGS.smoke):
        raise app.UsageError("--weights is required (or --smoke).")
    sizes = SMOKE if FLAGS.smoke else dict(size=SIZE, batch=BATCH, rounds=FLAGS.rounds,
                                           seconds=FLAGS.seconds)
    size, batch, seconds = sizes["size"], sizes["batch"], sizes["seconds"]
    weights = None if FLAGS.smoke else FLAGS.weights
    model = model_lib.create_model("mobilenet_v2", 2, size, 0.2, weights=weights,
                                   augment=False)
    start = time.perf_counter()
    folded = folding.fold_batch_norm(model_lib.get_backbone(model))
    fold_seconds = time.perf_counter() - start
    sides = {"backbone": features.pooled_model(model),
             "folded": features.pooled_model(model, folded)}
    forwards = {name: tf.function(lambda x, m=m: m(x, training=False))
                for name, m in sides.items()}
    images = tf.constant(np.random.default_rng(0).integers(0, 256, [batch, size, size, 3],
                                                           dtype=np.uint8))
    expected, got = (forwards[name](images).numpy() for name in ("backbone", "folded"))
    difference = float(np.abs(got - expected).max() / np.abs(expected).max())

    rounds = []
    for _ in range(sizes["rounds"]):
        result = {name: _measure(forward, images, seconds) for name, forward in forwards.items()}
        result["speedup"] = (result["folded"]["images_per_second"]
                             / result["backbone"]["images_per_second"])
        result["cpu_ratio"] = (result["folded"]["cpu_ms_per_image"]
                               / result["backbone"]["cpu_ms_per_image"])
        rounds.append(result)
        print(json.dumps(result), flush=True)
    summary = {
        "fold_seconds": fold_seconds,
        "batch_norm_layers_folded": len(folding.foldable_pairs(model_lib.get_backbone(model))),
        "max_difference_relative_to_largest_feature": difference,
        "median_speedup": statistics.median(r["speedup"] for r in rounds),
        "best_over_best_speedup": (max(r["folded"]["images_per_second"] for r in rounds)
                                   / max(r["backbone"]["images_per_second"] for r in rounds)),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
    }
    print(json.dumps(summary, indent=2))
    _write(rounds, summary, "python -m benchmarks.frozen_forward " + " ".join(sys.argv[1:]),
           size, batch)


def _write(rounds, summary, command, size, batch):
    lines = ["# Frozen backbone forward pass: BatchNorm folded or not", "", "```", command,
             "```", "", f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, MobileNetV2 "
             f"{size} px, batch {batch}, uint8 images in memory -> pooled features.", "",
             "| round | backbone (img/s) | folded (img/s) | speedup | "
             "CPU ms/image, backbone | folded | CPU ratio |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        a, b = r["backbone"], r["folded"]
        lines.append(f"| {i + 1} | {a['images_per_second']:.1f} | {b['images_per_second']:.1f}"
                     f" | {r['speedup']:.2f} | {a['cpu_ms_per_image']:.2f} | "
                     f"{b['cpu_ms_per_image']:.2f} | {r['cpu_ratio']:.2f} |")
    lines += ["", f"Median speedup **{summary['median_speedup']:.2f}x**; best over best "
              f"{summary['best_over_best_speedup']:.2f}x; median CPU-time ratio "
              f"{summary['median_cpu_ratio']:.2f}.",
              f"{summary['batch_norm_layers_folded']} BatchNorm layers folded in "
              f"{summary['fold_seconds']:.2f} s. Largest feature difference: "
              f"{summary['max_difference_relative_to_largest_feature']:.1e} of the largest "
              "feature.", ""]
    report.write(FLAGS.out_dir, "frozen_forward", command, rounds, summary, lines)


if __name__ == "__main__":
    app.run(main)
