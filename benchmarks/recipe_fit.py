"""Does the recipe fit the data? ``--recipe=auto`` vs the tutorial preset vs a grid, per set size.

Run (about 20 minutes on 2 cores):

    python -m benchmarks.recipe_fit \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Sets, all from ``--data_dir``: the full set, and subsets keeping ``N`` train
images per class (chosen by a seeded shuffle of the sorted file names,
linked into a temporary folder); validation is always the full validation
folder, and the test split is the trainer's deterministic fifth of it (the
same 200 images for every side). On each set it runs our trainer with

* ``tutorial``: ``--recipe=tutorial`` (10 + 10 epochs, Adam 1e-4, RMSprop 1e-5);
* ``auto``: the default recipe;
* ``grid lr=X epochs=E``: the tutorial preset with its head learning rate and
  phase-1 epochs changed, as an oracle of what tuning those two knobs by hand
  would reach (phase 2 stays the tutorial's);

one after the other in one process, and reports test accuracy, validation
accuracy (phase 1 and final), the rates used and wall time (the whole job:
feature caches, both phases, export and evaluation). ``--smoke`` runs the
same code on a few generated images in seconds (the test suite does).
Results go to recipe_fit.json and recipe_fit.md in ``--out_dir`` (``--name``
renames them; ``--sides`` and ``--extra_flags`` run variants, such as
``--sides=auto --extra_flags=--image_size=224``).
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import os
import random
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import tensorflow as tf
from absl import app
from absl import flags

from benchmarks import report
from trainer import config as config_lib
from trainer import train
from trainer.data import demo as demo_data

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "A folder of train/ and validation/ class folders.")
flags.DEFINE_string("weights", None, "Backbone weights file (the trainer's --weights).")
flags.DEFINE_list("train_per_class", ["all", "60", "20"],
                  "Sets: 'all' train images, or this many per class.")
flags.DEFINE_list("grid_learning_rates", ["1e-4", "1e-3"], "Grid: phase-1 learning rates.")
flags.DEFINE_list("grid_epochs", ["10", "50"], "Grid: phase-1 epochs.")
flags.DEFINE_integer("seed", 42, "Seed of the subsets.")
flags.DEFINE_string("work_dir", "", "Scratch folder (default: a new temporary folder).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where the results are written.")
flags.DEFINE_list("sides", [], "Run only these sides (names as in the report); empty: all.")
flags.DEFINE_list("auto_image_sizes", [],
                  "Also run auto at these --image_size values (sides 'auto image_size=S').")
flags.DEFINE_list("extra_flags", [], "Trainer flags added to every side, e.g. --image_size=224.")
flags.DEFINE_string("name", "recipe_fit", "Results file name, without extension.")
flags.DEFINE_bool("smoke", False, "Generated 32-px shapes, demo_cnn, tiny budgets: seconds.")

_SMOKE_FLAGS = ["--image_size=32", "--batch_size=4", "--backbone=demo_cnn", "--fine_tune_at=5",
                "--weights=none"]


def subset(source: str, target: str, per_class: int, seed: int) -> str:
    """``target`` with ``per_class`` of each train class of ``source`` (links), validation whole."""
    for class_name in sorted(os.listdir(f"{source}/train")):
        names = sorted(os.listdir(f"{source}/train/{class_name}"))
        keep = random.Random(f"{seed}/{class_name}").sample(names, min(per_class, len(names)))
        os.makedirs(f"{target}/train/{class_name}")
        for name in sorted(keep):
            os.symlink(os.path.abspath(f"{source}/train/{class_name}/{name}"),
                       f"{target}/train/{class_name}/{name}")
    os.symlink(os.path.abspath(f"{source}/validation"), f"{target}/validation")
    return target


def sides() -> Dict[str, List[str]]:
    """Side name -> the trainer flags that make it."""
    if FLAGS.smoke:
        return {"tutorial": ["--recipe=tutorial", "--epochs=2", "--fine_tune_epochs=1",
                             "--learning_rate=1e-3"],
                "auto": ["--epochs=2", "--fine_tune_epochs=1", "--head_learning_rates=1e-3,1e-2"]}
    grid = {f"grid lr={float(lr):g} epochs={epochs}": [
        "--recipe=tutorial", f"--learning_rate={lr}", f"--epochs={epochs}"]
        for lr in FLAGS.grid_learning_rates for epochs in FLAGS.grid_epochs}
    grid.pop("grid lr=0.0001 epochs=10", None)  # That is the tutorial preset itself.
    sizes = {f"auto image_size={size}": [f"--image_size={size}"]
             for size in FLAGS.auto_image_sizes}
    every = {"tutorial": ["--recipe=tutorial"], "auto": [], **sizes, **grid}
    return {name: side for name, side in every.items() if not FLAGS.sides or name in FLAGS.sides}


def run_side(data_dir: str, job_dir: str, side_flags: Sequence[str]) -> Dict:
    """One job of our trainer: its accuracies, rates and wall time."""
    shutil.rmtree(job_dir, ignore_errors=True)
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    weights = [] if FLAGS.smoke else [f"--weights={FLAGS.weights}"]
    fv(["trainer", f"--data_dir={data_dir}", f"--job_dir={job_dir}", "--strategy=one_device",
        *weights, *(_SMOKE_FLAGS if FLAGS.smoke else []), *FLAGS.extra_flags,
        *side_flags])
    config = config_lib.config_from_flags(fv, environ={})
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
    seconds = time.perf_counter() - start
    phases = metrics["recipe"]["phases"]
    return {
        "flags": list(side_flags),
        "seconds": seconds,
        "test_accuracy": metrics["test"]["accuracy"],
        "val_accuracy": metrics["validation"]["accuracy"],
        "phase1_val_accuracy": _phase_one_accuracy(metrics, phases),
        "learning_rates": [p["learning_rate"] for p in phases],
        "steps": [p["steps_per_epoch"] * (p["last_epoch"] - p["first_epoch"]) for p in phases],
        "epochs_run": len(metrics["history"].get("loss", [])),
        "search": metrics["recipe"].get("search"),
    }


def _phase_one_accuracy(metrics: Dict, phases: List[Dict]) -> float:
    """Validation accuracy of the weights phase 1 ended on (its best epoch under auto)."""
    history = metrics["history"]
    end = phases[1]["first_epoch"] if len(phases) > 1 else len(history["val_loss"])
    losses, accuracies = history["val_loss"][:end], history["val_accuracy"][:end]
    if phases[0]["restore_best"]:
        return accuracies[min(range(len(losses)), key=losses.__getitem__)]
    return accuracies[-1]


def summarize(results: Dict[str, Dict[str, Dict]]) -> Dict:
    """Per set: auto against the tutorial preset and against the best of all other sides."""
    summary = {}
    for set_name, by_side in results.items():
        if not {"auto", "tutorial"} <= set(by_side):
            continue
        auto, tutorial = by_side["auto"], by_side["tutorial"]
        others = {name: r for name, r in by_side.items() if not name.startswith("auto")}
        best = max(others, key=lambda name: others[name]["test_accuracy"])
        summary[set_name] = {
            "auto_minus_tutorial_test_accuracy": auto["test_accuracy"] - tutorial["test_accuracy"],
            "best_other_side": best,
            "auto_minus_best_other_test_accuracy":
                auto["test_accuracy"] - others[best]["test_accuracy"],
            "auto_time_ratio_to_tutorial": auto["seconds"] / tutorial["seconds"],
        }
    return summary


def markdown(results, summary, command: str) -> List[str]:
    lines = ["# Does the recipe fit the data? auto vs tutorial preset vs grid", "", "```",
             command, "```", "", f"{os.cpu_count()} cores, TensorFlow {tf.__version__}. "
             "Test: the same 200 held-out validation images for every side "
             "(one image = 0.5 points).", ""]
    for set_name, by_side in results.items():
        lines += [f"## {set_name}", "",
                  "| side | test acc. | val. acc. phase 1 / final | lr phase 1 / 2 | "
                  "steps phase 1 / 2 (budget) | seconds |", "|---|---|---|---|---|---|"]
        for side, r in by_side.items():
            rates = " / ".join(f"{rate:g}" for rate in r["learning_rates"])
            steps = " / ".join(str(s) for s in r["steps"])
            lines.append(f"| {side} | {r['test_accuracy']:.3f} | {r['phase1_val_accuracy']:.4f}"
                         f" / {r['val_accuracy']:.4f} | {rates} | {steps} | {r['seconds']:.0f} |")
        search = by_side["auto"].get("search")
        if search:
            lines += ["", "auto's phase-1 search (validation):", "",
                      "| lr | val. loss | val. acc. | best step / run |", "|---|---|---|---|"]
            lines += [f"| {t['learning_rate']:g} | {t['val_loss']:.4f} | {t['val_accuracy']:.4f}"
                      f" | {t['best_step']} / {t['steps_run']} |" for t in search]
        s = summary.get(set_name)
        if not s:
            continue
        lines += ["", f"auto - tutorial test accuracy: {s['auto_minus_tutorial_test_accuracy']:+.3f};"
                  f" auto - best other side ({s['best_other_side']}): "
                  f"{s['auto_minus_best_other_test_accuracy']:+.3f}; auto time / tutorial time: "
                  f"{s['auto_time_ratio_to_tutorial']:.2f}.", ""]
    return lines


def main(argv):
    del argv
    if not FLAGS.smoke and not (FLAGS.data_dir and FLAGS.weights):
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="recipe_fit_")
    if FLAGS.smoke:
        source = demo_data.write_dataset(f"{work_dir}/shapes", ("circle", "square"),
                                         {"train": 8, "validation": 6}, size=32, seed=5)
        sets = {"smoke": source}
    else:
        sets = {}
        for size in FLAGS.train_per_class:
            name = "full" if size == "all" else f"{size} per class"
            sets[name] = FLAGS.data_dir if size == "all" else subset(
                FLAGS.data_dir, f"{work_dir}/subset_{size}", int(size), FLAGS.seed)
    results = {}
    for set_name, data_dir in sets.items():
        results[set_name] = {}
        for side, side_flags in sides().items():
            job_dir = f"{work_dir}/jobs/{set_name}/{side}".replace(" ", "_")
            results[set_name][side] = run_side(data_dir, job_dir, side_flags)
            print(f"{set_name} / {side}: {results[set_name][side]}", flush=True)
    summary = summarize(results)
    command = "python -m benchmarks.recipe_fit " + " ".join(sys.argv[1:])
    report.write(FLAGS.out_dir, FLAGS.name, command, [results], summary,
                 markdown(results, summary, command))
    if not FLAGS.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
