"""Multi-label on real photos: 2x2 mosaics of cats and dogs; the single-label reference.

Run (36 minutes on the 2 shared cores under load: the reference 23, multi-label 13; see
benchmarks/results/multilabel.md):

    python -m benchmarks.multilabel \
        --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

Builds, into a temporary folder (benchmarks/mosaics.py: seeded, no photo in
two splits), ``--train_mosaics`` / ``--validation_mosaics`` /
``--test_mosaics`` mosaics of ``--mosaic_size`` px, each of 1-4 photos
labelled ``cat`` and/or ``dog``, with their Vertex AI JSON Lines import
file. 224 px: the tiles are 112 px, and 224 is the backbone's native input,
which the default recipe picks for images this large (a larger mosaic would
only be resized down to it). Then, each as its own ``python -m
trainer.task`` process with the default recipe (no step or rate flags):

* ``multi_label``: ``--data_dir=<import.jsonl> --task=multi_label``; from its
  metrics.json test split: micro / macro F1, mean average precision,
  exact match, Hamming loss, per-class F1 and AP, and the per-class
  thresholds chosen on validation;
* ``single_label``: the single-label model trained on the train photos
  (the source's train/ folder) and tested on exactly the photos inside the
  test mosaics (validation: those inside the validation mosaics), linked
  as a train/ validation/ test/ folder; its test accuracy is the reference.

Also reported: the label-frequency baselines of the test mosaics' micro F1
(see ``frequency_baselines``). ``--smoke`` runs the same code on generated
48-px shapes (circles as cats, squares as dogs), 32-px mosaics, the demo
backbone with random weights (``--weights=none``) and tiny budgets: seconds.
Results go to multilabel.json and multilabel.md in ``--out_dir``.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Sequence

from absl import app
from absl import flags

from benchmarks import mosaics
from benchmarks import multilabel_report

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "A folder of train/ and validation/ cats/ dogs/ folders.")
flags.DEFINE_string("weights", None, "Backbone weights file (the trainer's --weights).")
flags.DEFINE_integer("train_mosaics", 1200, "Mosaics made from the train photos.")
flags.DEFINE_integer("validation_mosaics", 300, "Mosaics made from one half of validation.")
flags.DEFINE_integer("test_mosaics", 300, "Mosaics made from the other half of validation.")
flags.DEFINE_integer("mosaic_size", 224, "Mosaic side, pixels (each tile is half of it).")
flags.DEFINE_integer("seed", 42, "Seed of the halves, the photo decks and every mosaic.")
flags.DEFINE_list("sides", ["multi_label", "single_label"], "Which runs: multi_label, "
                  "single_label (the reference).")
flags.DEFINE_list("extra_flags", [], "Trainer flags added to both runs.")
flags.DEFINE_string("work_dir", "", "Scratch folder (default: a new temporary folder).")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where the results are written.")
flags.DEFINE_string("name", "multilabel", "Results file name, without extension.")
flags.DEFINE_bool("smoke", False, "Generated shapes, demo_cnn, tiny budgets: seconds.")

SIDES = ("multi_label", "single_label")
_SMOKE_COUNTS = {"train": 16, "validation": 8, "test": 8}
_SMOKE_FLAGS = ["--image_size=32", "--batch_size=4", "--backbone=demo_cnn", "--fine_tune_at=5",
                "--epochs=2", "--fine_tune_epochs=1",
                "--head_learning_rates=1e-2"]  # One search candidate: seconds.


def write_smoke_photos(root: str, per_class: int = 8, size: int = 48) -> str:
    """A stand-in for cats_and_dogs: ``train/`` and ``validation/`` of circles as cats,
    squares as dogs (trainer.data.demo's drawings), ``per_class`` of each."""
    from trainer.data import demo as demo_data

    for split in ("train", "validation"):
        for folder, shape in (("cats", "circle"), ("dogs", "square")):
            os.makedirs(f"{root}/{split}/{folder}")
            rng = random.Random(f"{split}/{shape}")
            for i in range(per_class):
                demo_data.draw_image(shape, size, rng).save(
                    f"{root}/{split}/{folder}/{i:03d}.jpg", quality=90)
    return root


def run_trainer(data_dir: str, job_dir: str, side_flags: Sequence[str], log_file: str) -> Dict:
    """One ``python -m trainer.task`` job; its metrics.json, config.json, flags, wall seconds.

    Raises:
      RuntimeError: the job failed (the message holds the end of its log).
    """
    shutil.rmtree(job_dir, ignore_errors=True)
    weights = "none" if FLAGS.smoke else FLAGS.weights
    trainer_flags = [f"--data_dir={data_dir}", f"--job_dir={job_dir}", f"--weights={weights}",
                     *(_SMOKE_FLAGS if FLAGS.smoke else []), *FLAGS.extra_flags, *side_flags]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        result = subprocess.run([sys.executable, "-m", "trainer.task", *trainer_flags],
                                stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        with open(log_file) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"trainer exited {result.returncode} (log {log_file}):\n{tail}")
    with open(os.path.join(job_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(job_dir, "config.json")) as f:
        config = json.load(f)  # The resolved config: the input side auto chose.
    return {"flags": trainer_flags, "seconds": seconds, "metrics": metrics, "config": config}


def multi_label_side(mosaic_set: mosaics.MosaicSet, work_dir: str) -> Dict:
    run = run_trainer(mosaic_set.import_file, f"{work_dir}/jobs/multi_label",
                      ["--task=multi_label"], f"{work_dir}/multi_label.log")
    return multilabel_report.multi_label_result(run)


def single_label_side(source: str, mosaic_set: mosaics.MosaicSet, work_dir: str) -> Dict:
    reference = mosaics.write_reference(source, mosaic_set, f"{work_dir}/reference")
    run = run_trainer(reference, f"{work_dir}/jobs/single_label", [],
                      f"{work_dir}/single_label.log")
    result = multilabel_report.single_label_result(run, mosaic_set)
    result["test_folder_is_test_mosaics_photos"] = same_photos(
        f"{reference}/test", mosaic_set.photos("test"))
    return result


def same_photos(folder: str, photos: Dict[str, list]) -> bool:
    """Whether ``folder``'s class folders hold exactly ``photos`` (by class and file name)."""
    listed = {c: sorted(os.listdir(f"{folder}/{c}")) for c in sorted(os.listdir(folder))}
    return listed == {c: sorted(os.path.basename(p) for p in paths)
                      for c, paths in photos.items()}


def main(argv):
    del argv
    if not FLAGS.smoke and not (FLAGS.data_dir and FLAGS.weights):
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    unknown = set(FLAGS.sides) - set(SIDES)
    if unknown:
        raise app.UsageError(f"--sides: unknown {sorted(unknown)}; choose from {SIDES}.")
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="multilabel_")
    if FLAGS.smoke:
        source = write_smoke_photos(f"{work_dir}/photos")
        counts, size = _SMOKE_COUNTS, 32
    else:
        source = FLAGS.data_dir
        counts = {"train": FLAGS.train_mosaics, "validation": FLAGS.validation_mosaics,
                  "test": FLAGS.test_mosaics}
        size = FLAGS.mosaic_size
    start = time.perf_counter()
    mosaic_set = mosaics.build(source, f"{work_dir}/mosaics", counts, size, FLAGS.seed)
    data = {"mosaic_size": size, "seed": FLAGS.seed, "build_seconds": time.perf_counter() - start,
            "splits": mosaic_set.stats(),
            "photos_in_two_splits": len(mosaic_set.shared_photos()),
            "frequency_baselines": multilabel_report.frequency_baselines(mosaic_set)}
    print(f"data: {data}", flush=True)
    results: Dict[str, Dict] = {}
    if "single_label" in FLAGS.sides:
        results["single_label"] = single_label_side(source, mosaic_set, work_dir)
        print(f"single_label: {results['single_label']}", flush=True)
    if "multi_label" in FLAGS.sides:
        results["multi_label"] = multi_label_side(mosaic_set, work_dir)
        print(f"multi_label: {results['multi_label']}", flush=True)
    command = "python -m benchmarks.multilabel " + " ".join(sys.argv[1:])
    summary = multilabel_report.summarize(data, results)
    multilabel_report.write(FLAGS.out_dir, FLAGS.name, command, data, results, summary)
    if not FLAGS.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
