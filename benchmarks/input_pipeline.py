"""Images/s of the trainer's input pipeline beside the decode limit and the tutorial's way.

    python -m benchmarks.input_pipeline --data_dir=../shared/data/cats_and_dogs_filtered

(from the repository root). On the train split of ``--data_dir`` (image
folders, prepared here to TFRecords under ``--work_dir`` first), decoding
and resizing to ``--image_size`` in batches of ``--batch_size``, one run
measures side by side:

* ``decode_limit``: a bare ``tf.data`` map of ``decode_jpeg`` + resize over
  the same JPEG bytes held in memory, with the same (AUTOTUNE) parallelism;
* ``ours_local``: ``trainer.data.pipeline.make_dataset`` on the local
  records as training reads them: the first epoch (read, decode, fill the
  memory cache) and the cached epochs after it;
* ``tutorial_local``: ``image_dataset_from_directory`` on the JPEG folder,
  with ``prefetch`` as the transfer-learning tutorial does;
* ``ours_gcs`` and ``tutorial_gcs``: both again from gs:// through the local
  Cloud Storage emulator (tests/gcs_emulator.py), which waits ``--delay_ms``
  before each request to model Cloud Storage's latency to first byte.

Targets (issue 3): ours_local first epoch >= 0.9x decode_limit; ours_gcs
first epoch >= 10x tutorial_gcs and >= 0.8x ours_local. Results go to
``--output_dir`` as input_pipeline.json and input_pipeline.md, with the
command that made them. Each local figure is the best of ``--repeats`` runs
(other processes share the CPUs); the gs:// ones are single runs.
"""

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Dict, List

from tests import gcs_emulator

gcs_emulator.set_tensorflow_gcs_defaults()  # Read once, when TensorFlow is imported.

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import storage  # noqa: E402

from trainer.data import pipeline  # noqa: E402
from trainer.data import prepare as prepare_lib  # noqa: E402
from trainer.data import records  # noqa: E402

FLAGS = flags.FLAGS
_BUCKET = "bench"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "Image folders with train/ (and validation/).", **fv)
    flags.DEFINE_string(
        "work_dir", os.path.join(tempfile.gettempdir(), "input_pipeline_bench"),
        "Where the prepared records go (reused when up to date).", **fv)
    flags.DEFINE_string("output_dir", "benchmarks/results", "Where results are written.", **fv)
    flags.DEFINE_integer("image_size", 160, "Side of the resized images, pixels.", **fv)
    flags.DEFINE_integer("batch_size", 32, "Images per batch.", **fv)
    flags.DEFINE_integer("cached_epochs", 2, "Epochs measured after the first (cached).", **fv)
    flags.DEFINE_integer("repeats", 3, "Runs of each local measurement; the best counts.", **fv)
    flags.DEFINE_float("delay_ms", 30.0, "Emulator delay before each request, milliseconds.",
                       **fv)
    flags.DEFINE_bool("gcs", True, "Also measure from gs:// through the emulator.", **fv)


# ---------------------------------------------------------------- Measuring


def _rate(dataset, max_batches: int) -> float:
    """Images per second over at most ``max_batches`` batches, pipeline start included."""
    start = time.perf_counter()
    count = 0
    for images, _ in dataset.take(max_batches):
        count += int(images.shape[0])
    return count / (time.perf_counter() - start)


def _epoch_rates(dataset, batches_per_epoch: int, epochs: int) -> List[float]:
    """Images per second of each epoch of a repeating dataset, in order."""
    iterator = iter(dataset)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for _ in range(batches_per_epoch):
            images, _ = next(iterator)
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - start))
    return rates


def decode_limit(split: pipeline.Split, image_size: int, batch_size: int) -> float:
    """The bare decode + resize map over the split's JPEG bytes, held in memory."""
    encoded = [records.parse_example(r)[0] for r in tf.data.TFRecordDataset(list(split.shards))]
    ds = tf.data.Dataset.from_tensor_slices(tf.stack(encoded))
    ds = ds.map(lambda e: tf.image.resize(tf.io.decode_jpeg(e, channels=3),
                                          [image_size, image_size]),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).map(lambda images: (images, 0)).prefetch(tf.data.AUTOTUNE)
    return _rate(ds, math.ceil(len(encoded) / batch_size))


def ours(split: pipeline.Split, image_size: int, batch_size: int, epochs: int,
         deterministic: bool = False) -> List[float]:
    """make_dataset as training uses it (memory cache, shuffle, repeat): per-epoch rates."""
    ds = pipeline.make_dataset(split, image_size, batch_size, training=True, cache="memory",
                               seed=0, deterministic=deterministic)
    return _epoch_rates(ds, split.count // batch_size, epochs)


def tutorial(folder: str, image_size: int, batch_size: int) -> float:
    """image_dataset_from_directory + prefetch, one epoch."""
    ds = keras.utils.image_dataset_from_directory(
        folder, image_size=(image_size, image_size), batch_size=batch_size, shuffle=True,
        seed=0)
    return _rate(ds.prefetch(tf.data.AUTOTUNE), 10**9)


def _best(measure, repeats: int):
    results = [measure() for _ in range(repeats)]
    if isinstance(results[0], list):
        return max(results, key=lambda r: r[0]), results
    return max(results), results


# -------------------------------------------------------------------- Data


def _prepare(data_dir: str, work_dir: str) -> pipeline.Split:
    result = prepare_lib.prepare(data_dir, f"{work_dir}/records",
                                 prepare_lib.Options(progress=False))
    if not result.ok:
        raise SystemExit(f"prepare failed: {result.errors}")
    return pipeline.describe(f"{work_dir}/records").splits["train"]


def _upload(local_root: str, gcs_prefix: str, relative_paths) -> None:
    """Uploads straight to the emulator's server (no delay: setup, not measured)."""
    bucket = storage.Client(project="bench", credentials=AnonymousCredentials()).bucket(_BUCKET)
    for relative in relative_paths:
        bucket.blob(f"{gcs_prefix}/{relative}").upload_from_filename(
            os.path.join(local_root, relative))


def _files_below(root: str):
    for directory, _, names in os.walk(root):
        for name in names:
            yield os.path.relpath(os.path.join(directory, name), root)


def measure_gcs(split: pipeline.Split, data_dir: str, work_dir: str, delay_s: float,
                image_size: int, batch_size: int, epochs: int) -> Dict:
    """ours and tutorial from gs:// through the emulator with the per-request delay."""
    records_root = f"{work_dir}/records"
    with gcs_emulator.GcsEmulator(delay_s=delay_s) as gcs:
        gcs.create_bucket(_BUCKET)
        logging.info("Uploading records and JPEGs to the emulator.")
        _upload(records_root, "records",
                [records.MANIFEST] + [os.path.relpath(s, records_root) for s in split.shards])
        _upload(data_dir, "images", [f"train/{p}" for p in _files_below(f"{data_dir}/train")])
        gcs_split = pipeline.describe(f"gs://{_BUCKET}/records").splits["train"]
        logging.info("Measuring ours from gs://.")
        ours_gcs = ours(gcs_split, image_size, batch_size, 1 + epochs)
        logging.info("Measuring the tutorial's way from gs://.")
        tutorial_gcs = tutorial(f"gs://{_BUCKET}/images/train", image_size, batch_size)
    return {"ours_gcs": ours_gcs, "tutorial_gcs": tutorial_gcs}


# ----------------------------------------------------------------- Results


def _targets(r: Dict) -> List[Dict]:
    targets = [("ours_local first epoch >= 0.9x decode_limit",
                r["ours_local"][0], 0.9 * r["decode_limit"])]
    if "ours_gcs" in r:
        targets += [("ours_gcs first epoch >= 10x tutorial_gcs",
                     r["ours_gcs"][0], 10 * r["tutorial_gcs"]),
                    ("ours_gcs first epoch >= 0.8x ours_local first epoch",
                     r["ours_gcs"][0], 0.8 * r["ours_local"][0])]
    return [{"target": name, "value": round(value, 1), "threshold": round(threshold, 1),
             "met": value >= threshold} for name, value, threshold in targets]


def _markdown(results: Dict) -> str:
    r = results["images_per_second"]
    base = r["decode_limit"]
    rows = [("decode limit (bytes in memory)", base),
            ("ours, local, first epoch", r["ours_local"][0]),
            ("ours, local, cached epochs (mean)", _mean(r["ours_local"][1:])),
            ("ours, local, first epoch, deterministic", r["ours_local_deterministic"][0]),
            ("tutorial, local", r["tutorial_local"])]
    if "ours_gcs" in r:
        rows += [("ours, gs:// + delay, first epoch", r["ours_gcs"][0]),
                 ("ours, gs:// + delay, cached epochs (mean)", _mean(r["ours_gcs"][1:])),
                 ("tutorial, gs:// + delay", r["tutorial_gcs"])]
    lines = [
        "# Input pipeline benchmark", "",
        f"Command: `{results['command']}`", "",
        f"{results['images']} train images, {results['image_size']} px, batch "
        f"{results['batch_size']}; {results['machine']}; TensorFlow "
        f"{results['tensorflow']}; emulator delay {results['delay_ms']} ms per request; "
        f"{results['date']}.", "",
        "| pipeline | images/s | x decode limit |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {value:,.0f} | {value / base:.2f} |" for name, value in rows]
    lines += ["", "| target | value | threshold | met |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {t['target']} | {t['value']:,.0f} | {t['threshold']:,.0f} | "
              f"{'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def _main(argv):
    del argv
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required.")
    data_dir = FLAGS.data_dir.rstrip("/")
    size, batch = FLAGS.image_size, FLAGS.batch_size
    split = _prepare(data_dir, FLAGS.work_dir)
    epochs = 1 + FLAGS.cached_epochs
    logging.info("Measuring locally (%d repeats).", FLAGS.repeats)
    rates, runs = {}, {}
    for name, measure in [
            ("decode_limit", lambda: decode_limit(split, size, batch)),
            ("ours_local", lambda: ours(split, size, batch, epochs)),
            ("ours_local_deterministic", lambda: ours(split, size, batch, 1, True)),
            ("tutorial_local", lambda: tutorial(f"{data_dir}/train", size, batch))]:
        rates[name], runs[name] = _best(measure, FLAGS.repeats)
        logging.info("%s: %s", name, rates[name])
    if FLAGS.gcs:
        rates.update(measure_gcs(split, data_dir, FLAGS.work_dir, FLAGS.delay_ms / 1000,
                                 size, batch, FLAGS.cached_epochs))
    results = {
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.input_pipeline"]
                            + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
        "tensorflow": tf.__version__, "images": split.count, "image_size": size,
        "batch_size": batch, "delay_ms": FLAGS.delay_ms,
        "images_per_second": rates, "all_runs": runs,
    }
    results["targets"] = _targets(rates)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "input_pipeline.json"), "w") as f:
        json.dump(results, f, indent=2)
    markdown = _markdown(results)
    with open(os.path.join(FLAGS.output_dir, "input_pipeline.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
