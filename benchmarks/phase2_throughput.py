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
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import statistics
import sys
import time

import tensorflow as tf
import tf_keras as keras
from absl import app
from absl import flags

from benchmarks import report
from trainer import model as model_lib
from trainer.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder.")
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("steps", 25, "Train steps per measurement.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of (a) and (b).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where phase2_throughput.json and .md are written.")

BATCH = 32
SIZE = 160


class _StepClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def _images_per_second(model, dataset, steps: int, warmup: int = 5) -> float:
    """Steady-state rate inside one fit: steps after the first ``warmup`` ones."""
    clock = _StepClock()
    model.fit(dataset, steps_per_epoch=steps + warmup, epochs=1, verbose=0, callbacks=[clock])
    return steps * BATCH / (clock.times[-1] - clock.times[warmup - 1])


def main(argv):
    del argv
    split = pipeline.describe(FLAGS.data_dir).splits["train"]
    model = model_lib.create_model("mobilenet_v2", 2, SIZE, 0.2, weights=FLAGS.weights)
    model_lib.set_trainable_for_phase(model, 2, 100)
    loss, metrics = model_lib.loss_and_metrics(2)
    model.compile(keras.optimizers.RMSprop(1e-5), loss, metrics, jit_compile=False)

    ours = pipeline.make_dataset(split, SIZE, BATCH, training=True, cache="memory", seed=0)
    start = time.perf_counter()
    for _ in ours.take(split.count // BATCH + 1):  # Fill the cache: one pass.
        pass
    fill_seconds = time.perf_counter() - start
    in_memory = tf.data.Dataset.from_tensors(next(iter(ours))).repeat()

    rounds = []
    for _ in range(FLAGS.rounds):
        a = _images_per_second(model, in_memory, FLAGS.steps)
        b = _images_per_second(model, ours, FLAGS.steps)
        rounds.append({"in_memory": a, "pipeline": b, "ratio": b / a})
        print(rounds[-1], flush=True)
    summary = {
        "cache_fill_seconds": fill_seconds,
        "in_memory_images_per_second": statistics.median(r["in_memory"] for r in rounds),
        "pipeline_images_per_second": statistics.median(r["pipeline"] for r in rounds),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
    }
    print(json.dumps(summary, indent=2))
    _write(rounds, summary, "python -m benchmarks.phase2_throughput " + " ".join(sys.argv[1:]))


def _write(rounds, summary, command):
    lines = ["# Phase 2 throughput: pipeline vs in-memory tensors", "", "```", command, "```",
             "", f"{os.cpu_count()} cores, TensorFlow {tf.__version__}, MobileNetV2 160 px, "
             "batch 32, layers >= 100 trainable.", "",
             "| round | in memory (img/s) | our pipeline (img/s) | ratio |", "|---|---|---|---|"]
    for i, r in enumerate(rounds):
        lines.append(f"| {i + 1} | {r['in_memory']:.1f} | {r['pipeline']:.1f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", f"Median ratio: **{summary['median_ratio']:.3f}** (target >= 0.95).", ""]
    report.write(FLAGS.out_dir, "phase2_throughput", command, rounds, summary, lines)


if __name__ == "__main__":
    flags.mark_flags_as_required(["data_dir", "weights"])
    app.run(main)
