"""Phase 2: is the input pipeline ever the bottleneck?

Run (about 3 minutes on 2 cores):

    python -m benchmarks.phase2_throughput \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Measures fine-tuning (layers from 100 on, RMSprop, 160 px, batch 32) in
images/s, fed two ways in alternating rounds of the same run: (a) one batch
of tensors already in memory, repeated, which is the pure train step; (b) the
trainer's own pipeline over the decoded, resized, cached images (first epoch
filled the cache). Target: (b) >= 0.95 x (a). Results go to
benchmarks/results/phase2_throughput.{json,md}.

``--smoke`` runs the same code at toy size in seconds (generated shapes in a
temporary folder, 32 px, batch 4, random weights, one round of 2 steps) to
check that the benchmark still works; the test suite runs it
(tests/test_benchmarks.py). Its figures mean nothing.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import statistics
import sys
import tempfile
import time

import tensorflow as tf
import tf_keras as keras
from absl import app
from absl import flags

from benchmarks import report
from trainer import model as model_lib
from trainer.data import demo as demo_data
from trainer.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder.")
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("steps", 25, "Train steps per measurement.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of (a) and (b).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where phase2_throughput.json and .md are written.")
flags.DEFINE_bool("smoke", False,
                  "Toy size in seconds (generated data, 32 px, batch 4, random weights, "
                  "1 round of 2 steps): checks that the benchmark runs; its figures mean "
                  "nothing.")

BATCH = 32
SIZE = 160
SMOKE = dict(size=32, batch=4, steps=2, round_count=1)


class _StepClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def _images_per_second(model, dataset, steps: int, batch: int, warmup: int = 5) -> float:
    """Steady-state rate inside one fit: steps after the first ``warmup`` ones."""
    clock = _StepClock()
    model.fit(dataset, steps_per_epoch=steps + warmup, epochs=1, verbose=0, callbacks=[clock])
    return steps * batch / (clock.times[-1] - clock.times[warmup - 1])


def main(argv):
    del argv
    if FLAGS.smoke:
        with tempfile.TemporaryDirectory(prefix="phase2_smoke_") as folder:
            data_dir = demo_data.write_dataset(folder, ("circle", "square"),
                                               {"train": 16, "validation": 4}, size=32)
            _benchmark(data_dir, None, **SMOKE)
        return
    if not (FLAGS.data_dir and FLAGS.weights):
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    _benchmark(FLAGS.data_dir, FLAGS.weights, SIZE, BATCH, FLAGS.steps, FLAGS.rounds)


def _benchmark(data_dir, weights, size, batch, steps, round_count):
    split = pipeline.describe(data_dir).splits["train"]
    model = model_lib.create_model("mobilenet_v2", 2, size, 0.2, weights=weights)
    model_lib.set_trainable_for_phase(model, 2, 100)
    loss, metrics = model_lib.loss_and_metrics(2)
    model.compile(keras.optimizers.RMSprop(1e-5), loss, metrics, jit_compile=False)

    ours = pipeline.make_dataset(split, size, batch, training=True, cache="memory", seed=0)
    start = time.perf_counter()
    for _ in ours.take(split.count // batch + 1):  # Fill the cache: one pass.
        pass
    fill_seconds = time.perf_counter() - start
    in_memory = tf.data.Dataset.from_tensors(next(iter(ours))).repeat()

    rounds = []
    for _ in range(round_count):
        a = _images_per_second(model, in_memory, steps, batch)
        b = _images_per_second(model, ours, steps, batch)
        rounds.append({"in_memory": a, "pipeline": b, "ratio": b / a})
        print(rounds[-1], flush=True)
    summary = {
        "cache_fill_seconds": fill_seconds,
        "in_memory_images_per_second": statistics.median(r["in_memory"] for r in rounds),
        "pipeline_images_per_second": statistics.median(r["pipeline"] for r in rounds),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
    }
    print(json.dumps(summary, indent=2))
    _write(rounds, summary, "python -m benchmarks.phase2_throughput " + " ".join(sys.argv[1:]),
           size, batch)


def _write(rounds, summary, command, size, batch):
    lines = ["# Phase 2 throughput: pipeline vs in-memory tensors", "", "```", command, "```",
             "", f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, MobileNetV2 {size} px, "
             f"batch {batch}, layers >= 100 trainable.", "",
             "| round | in memory (img/s) | our pipeline (img/s) | ratio |", "|---|---|---|---|"]
    for i, r in enumerate(rounds):
        lines.append(f"| {i + 1} | {r['in_memory']:.1f} | {r['pipeline']:.1f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", f"Median ratio: **{summary['median_ratio']:.3f}** (target >= 0.95).", ""]
    report.write(FLAGS.out_dir, "phase2_throughput", command, rounds, summary, lines)


if __name__ == "__main__":
    app.run(main)
