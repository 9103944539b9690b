"""Reuse of the frozen work across tuning trials: four trials, one --cache_dir.

Run (about 10 minutes on 2 cores):

    nice -n 10 python -m benchmarks.cache_reuse \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Four trials of deploy/hptune.yaml's parameter ranges (learning_rate,
dropout, fine_tune_at; values drawn with a fixed seed) run one after the
other as ``python -m trainer.task`` processes, each with its own --job_dir
and all with one --cache_dir, on ``--train_images`` made from the train
images as benchmarks/cache_scale.py makes them plus ``--validation`` real
validation images, one epoch per phase. For each trial: seconds from its
launch to its first phase-1 step (the log line just before phase 1's fit),
of which the process's imports are a fixed part, what its metrics.json
says of each frozen output (computed or read), and what its
data_report.json says of the check of every image (its seconds, and how
many files were known usable by content, not decoded again). Target: trials 2-4 take
<= 0.2x trial 1's time before phase 1. Results go to
benchmarks/results/cache_reuse.{json,md}.

``--smoke`` runs two trials at toy size (generated shapes, demo_cnn, 32 px,
random weights); the test suite runs it (tests/test_benchmarks.py).
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml
from absl import app
from absl import flags

from benchmarks import derived_data
from benchmarks import report

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder.")
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("train_images", 1000, "Train images made from the train split.")
flags.DEFINE_integer("validation", 400, "Validation images (both classes together).")
flags.DEFINE_integer("trials", 4, "Trials run one after the other.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where cache_reuse.json and .md are written.")
flags.DEFINE_bool("smoke", False, "Two trials at toy size; figures mean nothing.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(REPO, "deploy", "hptune.yaml")
_PHASE_ONE = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d)\.(\d{6}) .*\] Phase 1: epochs", re.M)


def draw_trials(count: int, seed: int = 0):
    """``count`` parameter sets drawn from the tuning spec's ranges and scales."""
    with open(SPEC) as f:
        parameters = yaml.safe_load(f)["studySpec"]["parameters"]
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(count):
        values = {}
        for p in parameters:
            spec = p.get("doubleValueSpec") or p.get("integerValueSpec")
            low, high = float(spec["minValue"]), float(spec["maxValue"])
            if p.get("scaleType") == "UNIT_LOG_SCALE":
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                value = rng.uniform(low, high)
            values[p["parameterId"]] = (int(round(value)) if "integerValueSpec" in p
                                        else float(f"{value:.3g}"))
        trials.append(values)
    return trials


def _seconds_of_day(hours, minutes, seconds, micros):
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(micros) / 1e6


def run_trial(index, values, common, folder):
    job_dir = os.path.join(folder, f"trial_{index}")
    args = [f"--{k}={v}" for k, v in {**common, **values}.items()] + [f"--job_dir={job_dir}"]
    launched = time.time()
    out = subprocess.run([sys.executable, "-m", "trainer.task", *args], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    total = time.time() - launched
    if out.returncode:
        raise RuntimeError(out.stderr[-4000:])
    found = _PHASE_ONE.search(out.stderr)
    if not found:
        raise RuntimeError("No 'Phase 1: epochs' log line:\n" + out.stderr[-3000:])
    start = datetime.datetime.fromtimestamp(launched)
    start_of_day = _seconds_of_day(start.hour, start.minute, start.second, start.microsecond)
    to_phase_one = (_seconds_of_day(*found.groups()) - start_of_day) % 86400
    with open(os.path.join(job_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(job_dir, "data_report.json")) as f:
        screened = json.load(f)  # The check of every image: decoded, or known usable.
    return {"trial": index + 1, "parameters": values, "seconds_to_phase_one": to_phase_one,
            "seconds_total": total, "frozen_work": metrics["frozen_work"],
            "check_seconds": screened["check_seconds"],
            "known_usable": screened["summary"]["known_usable"],
            "val_accuracy": metrics["validation"]["accuracy"]}


def main(argv):
    del argv
    command = "python -m benchmarks.cache_reuse " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="cache_reuse_") as folder:
        data_dir = os.path.join(folder, "data")
        if FLAGS.smoke:
            from trainer.data import demo as demo_data

            source = demo_data.write_dataset(os.path.join(folder, "source"),
                                             ("circle", "square"),
                                             {"train": 8, "validation": 4}, size=32)
            derived_data.make_train_set(source, data_dir, 16, size=32)
            derived_data.copy_validation(source, data_dir, 8)
            common = dict(backbone="demo_cnn", weights="none", image_size=32, batch_size=4)
            trials = [dict(t, fine_tune_at=5) for t in draw_trials(2)]
        else:
            if not (FLAGS.data_dir and FLAGS.weights):
                raise app.UsageError("--data_dir and --weights are required (or --smoke).")
            derived_data.make_train_set(FLAGS.data_dir, data_dir, FLAGS.train_images)
            derived_data.copy_validation(FLAGS.data_dir, data_dir, FLAGS.validation)
            common = dict(weights=os.path.abspath(FLAGS.weights))
            trials = draw_trials(FLAGS.trials)
        common.update(data_dir=data_dir, cache_dir=os.path.join(folder, "cache"), epochs=1,
                      fine_tune_epochs=1)
        rows = []
        for index, values in enumerate(trials):
            rows.append(run_trial(index, values, common, folder))
            print(json.dumps(rows[-1]), flush=True)
        cache_bytes = sum(os.path.getsize(os.path.join(d, n))
                          for d, _, names in os.walk(common["cache_dir"]) for n in names)
    _write(rows, command, cache_bytes)


def _write(rows, command, cache_bytes):
    first = rows[0]["seconds_to_phase_one"]
    ratios = [r["seconds_to_phase_one"] / first for r in rows[1:]]
    summary = {"trial1_seconds_to_phase_one": first, "later_over_first": ratios,
               "max_later_over_first": max(ratios), "cache_dir_bytes": cache_bytes}
    lines = ["# Frozen work reused across tuning trials (one --cache_dir)", "", "```", command,
             "```", "",
             f"{os.cpu_count()} cores. Trials of deploy/hptune.yaml's ranges, one after the "
             "other, each a `python -m trainer.task` process (its imports included in the "
             "time to phase 1).", "",
             "| trial | learning_rate | dropout | fine_tune_at | s to first phase-1 step "
             "| x trial 1 | image check s (known usable) | pooled | frontier | flipped "
             "| total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, w = r["parameters"], r["frozen_work"]
        lines.append(
            f"| {r['trial']} | {p['learning_rate']:g} | {p['dropout']:g} | {p['fine_tune_at']} "
            f"| {r['seconds_to_phase_one']:.1f} | {r['seconds_to_phase_one'] / first:.2f} "
            f"| {r['check_seconds']:.1f} ({r['known_usable']}) "
            f"| {w.get('pooled/original', '-')} | {w.get('frontier/original', '-')} "
            f"| {w.get('frontier/flipped', '-')} | {r['seconds_total']:.0f} |")
    lines += ["", f"Trials 2-{len(rows)}: at most **{max(ratios):.2f}x** trial 1's time "
              "before phase 1 (target <= 0.2x). The cache folder holds "
              f"{cache_bytes / 1e6:.0f} MB at the end.", ""]
    report.write(FLAGS.out_dir, "cache_reuse", command, rows, summary, lines)


if __name__ == "__main__":
    app.run(main)
