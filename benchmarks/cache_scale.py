"""Cost of the frozen work against data size: in memory, spilled to disk, image fallback.

Run (sizes chosen to fit the 2-core machine; see the results file):

    nice -n 10 python -m benchmarks.cache_scale \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \
        --sizes=2000,10000 --side_by_side_rounds=0

(the recorded run; ``--paths=spilled --sizes=40000`` measures one path at a
size too large for the others on this machine).

Train sets of each size are made from the train images by deterministic
crops and flips, written as new JPEG files into a temporary folder (decode
costs stay real); validation is the first ``--validation`` images of the
real validation split. For each size, each path runs in a process of its
own (so its peak resident memory is its own), with the default recipe's
model (MobileNetV2, 160 px, batch 32, fine_tune_at 100, flip views):

* ``memory``: the frozen work held in memory (under --fine_tune_cache_max_gb);
* ``spilled``: the same work past the limit (limit 0): written to local
  disk while computed and streamed back each epoch;
* ``fallback``: what a cache past the limit did before (phase 2 reads
  images, decoded and cached in memory, and runs the whole backbone).

Then, at the largest size, phase 2's step rate over the in-memory and the
spilled cache side by side: alternating rounds in one process, so the load
of the shared machine hits both alike (``--side_by_side_rounds``).

Measured: seconds per 1,000 images of the frozen pass (phase 1's, and the
flipped views' before phase 2), of phase 1 (one epoch of the head) and of
phase 2 (steady-state train steps), and peak RSS. Results go to
benchmarks/results/cache_scale.{json,md}.

``--smoke`` runs the same code at toy size in seconds (generated shapes,
32 px, random weights); the test suite runs it (tests/test_benchmarks.py).
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from benchmarks import derived_data
from benchmarks import report

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder.")
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_list("sizes", ["500", "1000", "2000"], "Train set sizes, images.")
flags.DEFINE_integer("validation", 200, "Validation images (both classes together).")
flags.DEFINE_integer("image_size", 160, "Model input side, pixels.")
flags.DEFINE_integer("phase2_steps", 20, "Phase-2 steps timed (after 5 warm-up steps).")
flags.DEFINE_integer("side_by_side_rounds", 3,
                     "At the largest size: alternating rounds of phase-2 steps over the "
                     "in-memory and the spilled cache in one process; 0 skips them.")
flags.DEFINE_list("paths", list(("memory", "spilled", "fallback")),
                  "Paths measured at each size (a subset of memory, spilled, fallback).")
flags.DEFINE_string("name", "cache_scale", "Results file name (<name>.json, <name>.md).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where cache_scale.json and .md are written.")
flags.DEFINE_bool("smoke", False, "Toy size in seconds; its figures mean nothing.")
flags.DEFINE_string("worker", "", "Internal: run one measurement, JSON of "
                    "{data_dir, weights, path, image_size, batch, steps, scratch}.")

PATHS = ("memory", "spilled", "fallback")
BATCH = 32
WARMUP = 5


# ------------------------------------------------------------ One measurement


class _Clock:
    def __init__(self):
        self.times = []

    def callback(self):
        import tf_keras as keras

        clock = self

        class StepClock(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                clock.times.append(time.perf_counter())
        return StepClock()


def _fit_rate(model, data, steps, optimizer, lr, global_batch):
    """Steady-state images/s of ``steps`` train steps after WARMUP."""
    import tf_keras as keras

    from trainer import model as model_lib

    loss, metrics = model_lib.loss_and_metrics(2)
    model.compile({"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[
        optimizer](lr), loss, metrics)
    clock = _Clock()
    model.fit(data, steps_per_epoch=steps + WARMUP, epochs=1, verbose=0,
              callbacks=[clock.callback()])
    return steps * global_batch / (clock.times[-1] - clock.times[WARMUP - 1])


def measure(spec: dict) -> dict:
    """One path at one size: timings (s per 1,000 images) and peak RSS."""
    import tensorflow as tf

    from trainer import cluster
    from trainer import frozen_work
    from trainer import model as model_lib
    from trainer.data import pipeline

    tf.keras.utils.set_random_seed(0)
    data = pipeline.describe(spec["data_dir"])
    splits = [data.splits["train"], data.splits["validation"]]
    strategy = tf.distribute.get_strategy()
    size, batch, path = spec["image_size"], spec["batch"], spec["path"]
    model = model_lib.create_model(spec["backbone"], 2, size, 0.2, weights=spec["weights"],
                                   seed=0)
    work = frozen_work.FrozenWork(
        model, splits, strategy, cluster.ClusterInfo(), batch, 0, spec["fine_tune_at"],
        path != "fallback", True, 1e12 if path == "memory" else 0.0,
        spill_dir=spec["scratch"], backbone=spec["backbone"])
    n = splits[0].count + splits[1].count
    start = time.perf_counter()
    head, train_data, validation_data = work.phase_one()
    frozen_one = time.perf_counter() - start
    model_lib.set_trainable_for_phase(model, 1, spec["fine_tune_at"])
    steps = max(1, splits[0].count // batch)
    start = time.perf_counter()
    head_rate = _fit_rate(head, train_data, max(steps - WARMUP, 1), "adam", 1e-4, batch)
    phase_one = time.perf_counter() - start
    model_lib.set_trainable_for_phase(model, 2, spec["fine_tune_at"])
    start = time.perf_counter()
    if path == "fallback":
        two_model = model
        # As train.py feeds it: decoded images cached in memory; the model augments.
        two_data = pipeline.make_dataset(splits[0], size, batch, training=True,
                                         cache="memory", seed=0)
    else:
        two_model, two_data, _ = work.phase_two()
    frozen_two = time.perf_counter() - start
    rate = _fit_rate(two_model, two_data, spec["steps"], "rmsprop", 1e-5, batch)
    return {
        "path": path, "train_images": splits[0].count, "frozen_images": n,
        "frozen_pass_s_per_1000": 1000 * (frozen_one + (frozen_two if path != "fallback"
                                                        else 0.0)) / n,
        "frozen_pass_seconds": {"phase_one": frozen_one,
                                "flipped_before_phase_two": frozen_two
                                if path != "fallback" else 0.0},
        "phase1_s_per_1000": 1000 / head_rate, "phase1_epoch_seconds": phase_one,
        "phase2_s_per_1000": 1000 / rate, "phase2_images_per_second": rate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "frontier_in_memory": work.frontier_in_memory,
    }


def side_by_side(spec: dict) -> dict:
    """Phase-2 step rates over the in-memory and the spilled cache, alternating rounds
    in one process (the load of a shared machine hits both alike)."""
    import tensorflow as tf

    from trainer import cluster
    from trainer import frozen_work
    from trainer import model as model_lib
    from trainer.data import pipeline

    tf.keras.utils.set_random_seed(0)
    data = pipeline.describe(spec["data_dir"])
    splits = [data.splits["train"], data.splits["validation"]]
    model = model_lib.create_model(spec["backbone"], 2, spec["image_size"], 0.2,
                                   weights=spec["weights"], seed=0)
    datasets = {}
    for path, max_bytes in (("memory", 1e12), ("spilled", 0.0)):
        work = frozen_work.FrozenWork(
            model, splits, tf.distribute.get_strategy(), cluster.ClusterInfo(), spec["batch"],
            0, spec["fine_tune_at"], True, True, max_bytes, spill_dir=spec["scratch"],
            backbone=spec["backbone"])
        rest, datasets[path], _ = work.phase_two()
    model_lib.set_trainable_for_phase(model, 2, spec["fine_tune_at"])
    rounds = []
    for _ in range(spec["rounds"]):
        rates = {path: _fit_rate(rest, datasets[path], spec["steps"], "rmsprop", 1e-5,
                                 spec["batch"]) for path in ("memory", "spilled")}
        rounds.append({**rates, "ratio": rates["spilled"] / rates["memory"]})
    return {"path": "side_by_side", "train_images": splits[0].count, "rounds": rounds,
            "median_ratio": float(np.median([r["ratio"] for r in rounds]))}


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.cache_scale",
                          f"--worker={json.dumps(spec)}"], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ The run


def main(argv):
    del argv
    if FLAGS.worker:
        spec = json.loads(FLAGS.worker)
        run = side_by_side if spec["path"] == "side_by_side" else measure
        print(json.dumps(run(spec)), flush=True)
        return
    command = "python -m benchmarks.cache_scale " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="cache_scale_") as folder:
        if FLAGS.smoke:
            from trainer.data import demo as demo_data

            source = demo_data.write_dataset(os.path.join(folder, "source"),
                                             ("circle", "square"),
                                             {"train": 8, "validation": 4}, size=32)
            sizes, weights, image_size, steps, backbone, fine_tune_at, validation = (
                [16], None, 32, 2, "demo_cnn", 5, 8)
        else:
            if not (FLAGS.data_dir and FLAGS.weights):
                raise app.UsageError("--data_dir and --weights are required (or --smoke).")
            source, weights, image_size, steps = (FLAGS.data_dir, os.path.abspath(FLAGS.weights),
                                                  FLAGS.image_size, FLAGS.phase2_steps)
            sizes, backbone, fine_tune_at = [int(s) for s in FLAGS.sizes], "mobilenet_v2", 100
            validation = FLAGS.validation
        rows = []
        for count in sizes:
            data_dir = os.path.join(folder, f"train_{count}")
            derived_data.make_train_set(source, data_dir, count, size=32 if FLAGS.smoke else 0)
            derived_data.copy_validation(source, data_dir, validation)
            for path in [p for p in PATHS if p in FLAGS.paths]:
                spec = dict(data_dir=data_dir, weights=weights, path=path,
                            image_size=image_size, batch=4 if FLAGS.smoke else BATCH,
                            steps=steps, scratch=folder, backbone=backbone,
                            fine_tune_at=fine_tune_at)
                rows.append(_run_worker(spec))
                print(json.dumps(rows[-1]), flush=True)
                _write(rows, command)  # What is measured so far survives a cut run.
        if FLAGS.side_by_side_rounds:
            spec = dict(spec, path="side_by_side",
                        rounds=1 if FLAGS.smoke else FLAGS.side_by_side_rounds)
            rows.append(_run_worker(spec))
            print(json.dumps(rows[-1]), flush=True)
    _write(rows, command)


def _write(rows, command):
    paired = [r for r in rows if r["path"] == "side_by_side"]
    rows = [r for r in rows if r["path"] != "side_by_side"]
    by_size = {}
    for row in rows:
        by_size.setdefault(row["train_images"], {})[row["path"]] = row
    summary = {"phase2_spilled_over_memory_rate": {
        str(n): paths["spilled"]["phase2_images_per_second"]
        / paths["memory"]["phase2_images_per_second"] for n, paths in by_size.items()
        if "spilled" in paths and "memory" in paths},
        "peak_rss_mb": {str(n): {p: r["peak_rss_mb"] for p, r in paths.items()}
                        for n, paths in by_size.items()},
        "side_by_side": paired[0] if paired else None}
    lines = ["# Frozen work against data size: in memory, spilled, image fallback", "",
             "```", command, "```", "",
             f"{os.cpu_count()} cores (shared with other jobs: the load moves single "
             "rows' rates). Each row is a process of its own. Seconds per 1,000 "
             "images: frozen pass = phase 1's pass (pooled + frontier, or pooled only for the "
             "fallback) plus the flipped views' pass, over train + validation images; phase 1 "
             "= head steps; phase 2 = steady-state train steps.", "",
             "| train images | path | frozen pass (s/1k) | phase 1 (s/1k) | phase 2 (s/1k) "
             "| phase 2 vs memory | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for n, paths in sorted(by_size.items()):
        for path in [p for p in PATHS if p in paths]:
            r = paths[path]
            memory = paths.get("memory")
            ratio = (f"{r['phase2_images_per_second'] / memory['phase2_images_per_second']:.2f}x"
                     if memory else "-")
            lines.append(f"| {n} | {path} | {r['frozen_pass_s_per_1000']:.1f} | "
                         f"{r['phase1_s_per_1000']:.2f} | {r['phase2_s_per_1000']:.1f} | "
                         f"{ratio} | {r['peak_rss_mb']:.0f} |")
    if paired:
        p = paired[0]
        lines += ["", f"Phase 2 side by side, {p['train_images']} train images, one process, "
                  "alternating rounds:", "",
                  "| round | in memory (img/s) | spilled (img/s) | spilled / memory |",
                  "|---|---|---|---|"]
        for i, r in enumerate(p["rounds"]):
            lines.append(f"| {i + 1} | {r['memory']:.1f} | {r['spilled']:.1f} | "
                         f"{r['ratio']:.2f} |")
        lines += ["", f"Median: spilled at **{p['median_ratio']:.2f}x** the in-memory step "
                  "rate (goal >= 0.9x)."]
    lines.append("")
    report.write(FLAGS.out_dir, FLAGS.name, command, rows + paired, summary, lines)


if __name__ == "__main__":
    app.run(main)
