"""Whole recipe, side by side: the tutorial's way vs our trainer, same data and weights.

Run (about 10 minutes on 2 cores):

    python -m benchmarks.recipe \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Both sides train the same epochs on the same machine in one invocation. It
reports wall time per phase, validation accuracy after every epoch, when each
side first reaches the tutorial's final validation accuracy, test accuracy on
one shared held-out set (our deterministic fifth of validation; the tutorial's
own reshuffled test batches are reported too), and the ratios. Results go to
benchmarks/results/recipe.json and recipe.md with the command that made them.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import tensorflow as tf
from absl import app
from absl import flags
from tensorboard.backend.event_processing import event_accumulator

from benchmarks import tutorial_recipe
from trainer import config as config_lib
from trainer import train
from trainer.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder (train/, validation/).")
flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.")
flags.DEFINE_integer("epochs", 10, "Phase-1 epochs of both sides.")
flags.DEFINE_integer("fine_tune_epochs", 10, "Phase-2 epochs of both sides.")
flags.DEFINE_string("work_dir", "/tmp/recipe_benchmark", "Scratch folder for our job dirs.")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where recipe.json and recipe.md are written.")
flags.DEFINE_list("sides", ["tutorial", "ours", "ours_fast"], "Which sides to run.")
flags.DEFINE_list(
    "fast_flags", ["--learning_rate=1e-3", "--fine_tune_epochs=2"],
    "Trainer flags of the 'ours_fast' side: the better schedule that the "
    "feature cache allows (phase 1 costs little, so it can learn faster).")
flags.DEFINE_bool("feature_cache", True, "Our side's --feature_cache.")
flags.DEFINE_bool("smoke", False, "Generated 32-px data, random weights, one epoch a phase, "
                  "tutorial and ours: seconds; its figures mean nothing.")

_SMOKE_SIZE = tutorial_recipe.SMOKE["image_size"]


def _shared_test_set(data_dir: str):
    return pipeline.describe(data_dir, test_fraction=0.2, seed=42).splits["test"]


def _image_size() -> int:
    return _SMOKE_SIZE if FLAGS.smoke else 160


def _accuracy_on(model_fn, split, binary_logit: bool) -> float:
    dataset = pipeline.make_dataset(split, _image_size(), 64, training=False, cache="none")
    correct = 0
    for images, labels in dataset:
        out = model_fn(images)
        predicted = (out[:, 0] > 0).numpy().astype(int) if binary_logit else out
        correct += int((predicted == labels.numpy()).sum())
    return correct / split.count


def run_tutorial(test_split) -> dict:
    def shared_test(model):
        return {"test_accuracy": _accuracy_on(lambda x: model(x, training=False), test_split,
                                              binary_logit=True)}
    size = dict(image_size=_SMOKE_SIZE, batch_size=tutorial_recipe.SMOKE["batch_size"]
                ) if FLAGS.smoke else {}
    return tutorial_recipe.run(FLAGS.data_dir, FLAGS.weights, FLAGS.epochs,
                               FLAGS.fine_tune_epochs, on_model=shared_test, **size)


def run_ours(name: str, extra_flags=()) -> dict:
    job_dir = os.path.join(FLAGS.work_dir, name)
    shutil.rmtree(job_dir, ignore_errors=True)
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    smoke = [f"--image_size={_SMOKE_SIZE}", "--batch_size=4"] if FLAGS.smoke else []
    fv(["trainer", f"--data_dir={FLAGS.data_dir}", f"--job_dir={job_dir}",
        f"--weights={FLAGS.weights or 'none'}", f"--epochs={FLAGS.epochs}", *smoke,
        f"--fine_tune_epochs={FLAGS.fine_tune_epochs}", "--strategy=one_device",
        # The tutorial's schedule, epoch for epoch: this benchmark compares speed at equal
        # work (benchmarks/recipe_fit.py compares the default --recipe=auto).
        "--recipe=tutorial",
        f"--feature_cache={FLAGS.feature_cache}", *extra_flags])
    config = config_lib.config_from_flags(fv, environ={})
    start_wall = time.time()
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
    total = time.perf_counter() - start
    epochs = _epoch_times(f"{config.log_dir}/validation", start_wall)
    phase1_end = epochs[config.epochs - 1]["seconds"] if config.epochs else 0.0
    return {
        "flags": list(extra_flags),
        "phase1_seconds": phase1_end,
        "phase2_seconds": epochs[-1]["seconds"] - phase1_end,
        # Training ends with the last epoch; ours then exports, reloads and
        # evaluates the SavedModel, which the tutorial does not do.
        "total_seconds": epochs[-1]["seconds"],
        "with_export_and_evaluation_seconds": total,
        "epochs": epochs,
        "test_accuracy": metrics["test"]["accuracy"],
    }


def _epoch_times(validation_log_dir: str, start_wall: float):
    """Per-epoch validation accuracy with its wall time, from the TensorBoard events."""
    acc = event_accumulator.EventAccumulator(validation_log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return [{"epoch": e.step + 1, "seconds": e.wall_time - start_wall,
             "val_accuracy": float(tf.make_ndarray(e.tensor_proto))}
            for e in acc.Tensors("epoch_accuracy")]


def _first_reaching(epochs, target):
    return next((e["seconds"] for e in epochs if e["val_accuracy"] >= target), None)


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def summarize(results: dict) -> dict:
    tut, ours = results.get("tutorial"), results.get("ours")
    if not (tut and ours):
        return {}
    target = tut["epochs"][-1]["val_accuracy"]
    target_phase1 = tut["epochs"][FLAGS.epochs - 1]["val_accuracy"]
    ours_phase1_epochs = ours["epochs"][:FLAGS.epochs]
    return {
        "tutorial_final_val_accuracy": target,
        "tutorial_phase1_val_accuracy": target_phase1,
        "phase1_time_ratio": _ratio(ours["phase1_seconds"], tut["phase1_seconds"]),
        "phase2_time_ratio": _ratio(ours["phase2_seconds"], tut["phase2_seconds"]),
        "total_time_ratio": _ratio(ours["total_seconds"], tut["total_seconds"]),
        "ours_seconds_to_tutorial_phase1_accuracy": _first_reaching(ours_phase1_epochs,
                                                                    target_phase1),
        "phase1_time_to_accuracy_ratio": _ratio(
            _first_reaching(ours_phase1_epochs, target_phase1), tut["phase1_seconds"]),
        "ours_seconds_to_tutorial_final_accuracy": _first_reaching(ours["epochs"], target),
        "time_to_final_accuracy_ratio": _ratio(_first_reaching(ours["epochs"], target),
                                               tut["total_seconds"]),
        "test_accuracy_difference": ours["test_accuracy"] - tut["test_accuracy"],
        **_fast_summary(results.get("ours_fast"), target, tut),
    }


def _fast_summary(fast, target, tut) -> dict:
    if not fast:
        return {}
    reached = _first_reaching(fast["epochs"], target)
    return {
        "fast_seconds_to_tutorial_final_accuracy": reached,
        "fast_time_to_final_accuracy_ratio": _ratio(reached, tut["total_seconds"]),
        "fast_total_time_ratio": _ratio(fast["total_seconds"], tut["total_seconds"]),
        "fast_test_accuracy_difference": fast["test_accuracy"] - tut["test_accuracy"],
    }


def write_report(results: dict, summary: dict, command: str) -> None:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    report = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "tensorflow": tf.__version__, "results": results, "summary": summary}
    with open(os.path.join(FLAGS.out_dir, "recipe.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# Whole recipe: tutorial's way vs ours", "", "```", command, "```", "",
             f"{report['machine']}, TensorFlow {tf.__version__}.", "",
             f"ours_fast: {' '.join(FLAGS.fast_flags)}.", "",
             "| | tutorial | ours | ratio | ours_fast | ratio |", "|---|---|---|---|---|---|"]
    tut, ours, fast = (results.get(k, {}) for k in ("tutorial", "ours", "ours_fast"))
    for key in ("phase1_seconds", "phase2_seconds", "total_seconds",
                "with_export_and_evaluation_seconds"):
        a, b, c = tut.get(key), ours.get(key), fast.get(key)
        lines.append(f"| {key} | {_fmt(a)} | {_fmt(b)} | {_fmt(_ratio(b, a))} | {_fmt(c)} "
                     f"| {_fmt(_ratio(c, a))} |")
    lines.append(f"| test accuracy (shared split) | {_fmt(tut.get('test_accuracy'))} | "
                 f"{_fmt(ours.get('test_accuracy'))} | | {_fmt(fast.get('test_accuracy'))} | |")
    lines += ["", "Validation accuracy after each epoch (seconds since start):", "",
              "| epoch | tutorial | ours | ours_fast |", "|---|---|---|---|"]
    columns = [side.get("epochs", []) for side in (tut, ours, fast)]
    for i in range(max(len(c) for c in columns)):
        cells = [f"{e[i]['val_accuracy']:.4f} ({e[i]['seconds']:.0f} s)" if i < len(e) else ""
                 for e in columns]
        lines.append(f"| {i + 1} | {' | '.join(cells)} |")
    lines += ["", "Summary:", "", "```", json.dumps(summary, indent=2), "```", ""]
    with open(os.path.join(FLAGS.out_dir, "recipe.md"), "w") as f:
        f.write("\n".join(lines))


def _fmt(value):
    return "" if value is None else f"{value:.4g}"


def main(argv):
    del argv
    if FLAGS.smoke:
        from trainer.data import demo as demo_data

        work = tempfile.mkdtemp(prefix="recipe_smoke_")
        # Validation of 10 batches: the tutorial takes a fifth of them as test.
        FLAGS.data_dir = demo_data.write_dataset(work, ("circle", "square"),
                                                 {"train": 8, "validation": 20}, size=32)
        FLAGS.weights, FLAGS.work_dir = None, f"{work}/jobs"
        FLAGS.epochs, FLAGS.fine_tune_epochs = 1, 1
        FLAGS.sides = ["tutorial", "ours"]
    elif not (FLAGS.data_dir and FLAGS.weights):
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    test_split = _shared_test_set(FLAGS.data_dir)
    results = {}
    if "tutorial" in FLAGS.sides:
        results["tutorial"] = run_tutorial(test_split)
    if "ours" in FLAGS.sides:
        results["ours"] = run_ours("ours")
    if "ours_fast" in FLAGS.sides:
        results["ours_fast"] = run_ours("ours_fast", FLAGS.fast_flags)
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    write_report(results, summary, "python -m benchmarks.recipe " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
