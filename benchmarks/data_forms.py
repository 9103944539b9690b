"""Data as users have it: folders vs Vertex AI import files, and class weighting on imbalance.

Run (about 10 minutes on 2 cores):

    python -m benchmarks.data_forms \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

    python -m benchmarks.data_forms --smoke --out_dir=/tmp/data_forms   # seconds, generated data

(a) The folders, an import CSV and an import JSONL written from them (with
ML_USE, absolute paths, into a temporary folder), each trained with the
tutorial's schedule (``--recipe=tutorial``): the listings must hold the same images in the same splits,
and the accuracies should agree within 0.5 points.
(b) An imbalanced variant, written as an import CSV: train keeps 10% of the
cats (chosen by seed 0), validation untouched; trained with
``--class_weighting=none`` and ``=balanced``, balanced accuracy side by side.

Results go to benchmarks/results/data_forms.{json,md} with the command.
``--smoke`` runs the same code on a tiny generated set (demo_cnn, random
weights, one epoch per phase), for the test suite.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import random
import sys
import tempfile
import time
from typing import Dict, List

import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from trainer import config as config_lib
from trainer import train
from trainer.data import demo as demo_data
from trainer.data import pipeline

FLAGS = flags.FLAGS
_ML_USE = {"train": "training", "validation": "validation"}
SMOKE_FLAGS = ["--backbone=demo_cnn", "--weights=none", "--image_size=32", "--batch_size=8",
               "--epochs=2", "--fine_tune_epochs=0", "--fine_tune_at=5",
               "--learning_rate=1e-2", "--noaugment"]
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder (train/, validation/).")
    flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
    flags.DEFINE_bool("smoke", False, "Tiny generated data, seconds: for the tests.")
    flags.DEFINE_float("keep_fraction", 0.1, "(b): share of the first class's train images kept.")
    flags.DEFINE_string("work_dir", "", "Scratch folder; empty: a new temporary folder.")
    flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                        "Where data_forms.json and data_forms.md are written.")


def folder_images(data_dir: str) -> List[Dict]:
    """(split, class, absolute path) of every image of a train/ + validation/ folder."""
    info = pipeline.describe(data_dir, test_fraction=0.0)
    return [{"split": name, "class": info.class_names[label], "path": os.path.abspath(path)}
            for name in ("train", "validation")
            for path, label in zip(info.splits[name].paths, info.splits[name].labels)]


def write_csv(images: List[Dict], path: str) -> str:
    with open(path, "w") as f:
        for image in images:
            f.write(f"{_ML_USE[image['split']]},{image['path']},{image['class']}\n")
    return path


def write_jsonl(images: List[Dict], path: str) -> str:
    with open(path, "w") as f:
        for image in images:
            f.write(json.dumps({
                "imageGcsUri": image["path"],
                "classificationAnnotation": {"displayName": image["class"]},
                "dataItemResourceLabels": {
                    "aiplatform.googleapis.com/ml_use": _ML_USE[image["split"]]}}) + "\n")
    return path


def imbalanced(images: List[Dict], keep_fraction: float, seed: int = 0) -> List[Dict]:
    """Train keeps ``keep_fraction`` of the first class (by name), chosen by ``seed``."""
    rare = sorted({i["class"] for i in images})[0]
    members = [i for i in images if i["split"] == "train" and i["class"] == rare]
    kept = {i["path"] for i in random.Random(seed).sample(members, round(len(members)
                                                                         * keep_fraction))}
    return [i for i in images
            if not (i["split"] == "train" and i["class"] == rare) or i["path"] in kept]


def train_once(name: str, data_dir: str, work_dir: str, base_flags: List[str],
               extra: List[str] = ()) -> Dict:
    """One training job through the trainer's own flags; its metrics and listing."""
    job_dir = os.path.join(work_dir, name)
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    # The tutorial's fixed schedule (the default when the results were recorded): this
    # compares data forms and weighting, not recipes (benchmarks/recipe_fit.py does).
    fv(["trainer", f"--data_dir={data_dir}", f"--job_dir={job_dir}", "--strategy=one_device",
        "--recipe=tutorial", *base_flags, *extra])
    config = config_lib.config_from_flags(fv, environ={})
    info = pipeline.describe(config.data_dir, config.test_fraction, config.seed)
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
    seconds = time.perf_counter() - start
    with open(os.path.join(job_dir, "data_report.json")) as f:
        data_report = json.load(f)
    result = {"name": name, "data_dir": data_dir, "flags": list(extra), "seconds": seconds,
              "layout": info.listing.summary, "check_seconds": data_report["check_seconds"],
              "counts": {s: info.splits[s].count for s in info.splits},
              "splits": {s: sorted(os.path.abspath(p) for p in info.splits[s].paths)
                         for s in info.splits}}
    for split in ("validation", "test"):
        result[split] = {key: metrics[split][key] for key in METRICS}
        result[split]["per_class_recall"] = {c: v["recall"] for c, v in
                                             metrics[split]["per_class"].items()}
    return result


def run(data_dir: str, weights: str, out_dir: str, smoke: bool, work_dir: str,
        keep_fraction: float, command: str) -> Dict:
    """Runs (a) and (b); writes the results; returns the summary."""
    work_dir = work_dir or tempfile.mkdtemp(prefix="data_forms_")
    os.makedirs(work_dir, exist_ok=True)
    if smoke:
        data_dir = demo_data.write_dataset(os.path.join(work_dir, "images"), ("circle", "square"),
                                           {"train": 20, "validation": 10}, size=32, seed=5)
        base_flags = list(SMOKE_FLAGS)
    else:
        base_flags = [f"--weights={weights}"]
    images = folder_images(data_dir)
    forms = {"folders": data_dir,
             "csv": write_csv(images, os.path.join(work_dir, "import.csv")),
             "jsonl": write_jsonl(images, os.path.join(work_dir, "import.jsonl"))}
    rounds = [train_once(name, path, work_dir, base_flags) for name, path in forms.items()]
    skewed = write_csv(imbalanced(images, keep_fraction), os.path.join(work_dir, "imbalanced.csv"))
    rounds += [train_once(f"imbalanced_{mode}", skewed, work_dir, base_flags,
                          [f"--class_weighting={mode}"]) for mode in ("none", "balanced")]
    summary = summarize(rounds)
    lines = markdown(rounds, summary, command, smoke)
    report.write(out_dir, "data_forms", command, rounds, summary, lines)
    return summary


def summarize(rounds: List[Dict]) -> Dict:
    by_name = {r["name"]: r for r in rounds}
    forms = [by_name[n] for n in ("folders", "csv", "jsonl")]
    spread = {split: 100 * (max(r[split]["accuracy"] for r in forms)
                            - min(r[split]["accuracy"] for r in forms))
              for split in ("validation", "test")}
    none, balanced = by_name["imbalanced_none"], by_name["imbalanced_balanced"]
    return {
        "same_splits": all(r["splits"] == forms[0]["splits"] for r in forms),
        "accuracy_spread_points": spread,
        "within_half_a_point": all(v <= 0.5 for v in spread.values()),
        "imbalanced_train_counts": none["counts"]["train"],
        "balanced_accuracy": {split: {"none": none[split]["balanced_accuracy"],
                                      "balanced": balanced[split]["balanced_accuracy"]}
                              for split in ("validation", "test")},
        "balanced_accuracy_gain_points": {
            split: 100 * (balanced[split]["balanced_accuracy"]
                          - none[split]["balanced_accuracy"]) for split in ("validation", "test")},
    }


def markdown(rounds: List[Dict], summary: Dict, command: str, smoke: bool) -> List[str]:
    lines = ["# Data forms: folders vs import files; class weighting on imbalance", "",
             "```", command, "```", "",
             f"{os.cpu_count()} cores, TensorFlow {tf.__version__}"
             + (" (smoke: tiny generated data, not a measurement)." if smoke else "."), "",
             "| run | layout | train/val/test | seconds | check s | val acc | val bal. acc "
             "| val macro F1 | test acc | test bal. acc | test macro F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        counts = "/".join(str(r["counts"].get(s, 0)) for s in ("train", "validation", "test"))
        cells = [f"{r[s][k]:.4f}" for s in ("validation", "test") for k in METRICS]
        lines.append(f"| {r['name']} | {r['layout'].split(';')[0][len('layout: '):]} | "
                     f"{counts} | {r['seconds']:.0f} | {r['check_seconds']:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Summary:", "", "```", json.dumps(summary, indent=2), "```", ""]
    return lines


def main(argv):
    del argv
    if not FLAGS.smoke and not (FLAGS.data_dir and FLAGS.weights):
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    summary = run(FLAGS.data_dir, FLAGS.weights, FLAGS.out_dir, FLAGS.smoke, FLAGS.work_dir,
                  FLAGS.keep_fraction,
                  "python -m benchmarks.data_forms " + " ".join(sys.argv[1:]))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
