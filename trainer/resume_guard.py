"""The resume guard: a job dir's backups resume only into the run that made them.

A re-run of a job dir resumes its backups (``checkpoints/phase<N>``) and
restores its finished phases (``finished.json``). Resumed into a different
recipe (another backbone, ``--fine_tune_at``, image size, data, ...) they
would silently mix two trainings, or fail deep inside Keras. So the first run
records, beside the backups, a fingerprint of everything a resume depends on
(``checkpoints/resume_fingerprint.json``, written by the chief), and every
later run compares before any image is read:

* same fingerprint: resume as before;
* different: refuse (``ResumeMismatch``), naming each differing field as
  ``old -> new`` and the two ways out: a new ``--job_dir``, or
  ``--discard_backups``, which deletes the old backups and finished-phase
  records and starts afresh. The flag discards only backups of *another*
  fingerprint, so it is safe to leave on: an in-place restart or a platform
  restart of the same command line still resumes its own backups.

What counts (``FIELDS``) is what changes the trained weights, the meaning
of a backup's step counters or what a backup holds: the model, its initial
weights, the schedule of each phase, the global batch, the classes and the
listed data, and the feature caches (``--feature_cache``,
``--fine_tune_cache`` and its ``--fine_tune_cache_max_gb``, which can switch
phase 2 between cached activations and images: a phase trained on the cache
backs up the unfrozen part alone, and such a backup does not restore into
the whole model). Flags that do
not (logging, ``--max_restarts``, ``--export_tflite``, checkpoint cadence,
caches, the strategy as long as the global batch is the same, ...) are in
``IGNORED`` and do not count; ``tests/test_resume_guard.py`` checks that every
Config field is in exactly one of the two.

Weights are identified by content: a local file by its SHA-256 (a 14 MB
MobileNetV2 file hashes in well under a second); a gs:// file by its size and
modification time from one ``stat``, since hashing would download it before
any check could refuse (the trainer copies it later anyway).
"""

import hashlib
import json
from typing import Dict, List, Optional

import tensorflow as tf
from absl import logging

from trainer import cluster
from trainer import config as config_lib
from trainer.data import pipeline
from trainer.data import records

FILE = "resume_fingerprint.json"  # In the checkpoint folder, beside phase1/, phase2/.
VERSION = 1

# Config fields that decide what a resumed backup continues.
FIELDS = ("backbone", "weights", "image_size", "fine_tune_at", "dropout", "recipe",
          "recipe_pinned", "epochs", "fine_tune_epochs", "optimizer", "fine_tune_optimizer",
          "learning_rate", "fine_tune_learning_rate", "head_learning_rates",
          "early_stopping_patience", "lr_schedule", "warmup_epochs", "label_smoothing",
          "augment", "class_weighting", "mixed_precision", "feature_cache", "fine_tune_cache",
          "seed", "task")
# Config fields that do not: where things go, how fast, how often, how verbose. The data
# options (split_fractions, test_fraction, strict, flatten_nested) count through the
# listing they produce ("data"), and batch_size through "global_batch".
IGNORED = ("data_dir", "job_dir", "model_dir", "checkpoint_dir", "log_dir", "strategy", "tpu",
           "batch_size", "checkpoint_every_steps", "test_fraction", "cache", "shuffle_buffer",
           "demo", "hypertune_metric", "export_tflite", "jit_compile", "max_restarts",
           "restart_wait_seconds",
           "split_fractions", "strict", "flatten_nested", "max_image_pixels",
           "discard_backups", "export_onnx", "watchdog_seconds", "watchdog_floor_seconds",
           # Where the frozen work lives; past the memory limit it spills, the same
           # features either way (trainer/frozen_work.py).
           "fine_tune_cache_max_gb", "cache_dir", "cache_spill_dir",
           # Chosen after training, on the final weights (trainer/thresholds.py).
           "multi_label_threshold")


class ResumeMismatch(config_lib.ConfigError):
    """The job dir holds backups of a different run; the message says what differs."""


def fingerprint(config: config_lib.Config, data: pipeline.DatasetInfo,
                global_batch: int) -> Dict:
    """What a resume of this run depends on, as a JSON-able dict of named fields."""
    values = {name: _jsonable(getattr(config, name)) for name in FIELDS}
    values["weights_content"] = _weights_identity(config.weights)
    values["global_batch"] = global_batch
    values["class_names"] = list(data.class_names)
    values["data"] = _listing_identity(data, config.data_dir)
    return {"version": VERSION, "fields": values}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _weights_identity(weights: str) -> str:
    if weights in ("imagenet", "none", config_lib.DEMO_SOURCE_WEIGHTS):
        return weights
    if weights.startswith("gs://"):
        stat = tf.io.gfile.stat(weights)
        return f"size {stat.length}, mtime {stat.mtime_nsec}"
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256 {digest.hexdigest()[:16]}"


def _listing_identity(data: pipeline.DatasetInfo, data_dir: str) -> str:
    """Counts per split and a hash of every (split, file, label), paths relative to the data.

    Relative paths: the same data copied elsewhere (or to gs://) resumes. Prepared
    records are identified by their shards, counts and the fingerprint of the plan that
    made them (their manifest's, which covers the input listing and the options).
    """
    root = data_dir.rstrip("/") + "/"
    digest = hashlib.sha256()
    if any(split.is_records for split in data.splits.values()):
        digest.update(records.read_manifest(root).get("source", {}).get(
            "fingerprint", "").encode())
    counts = []
    for name, split in sorted(data.splits.items()):
        counts.append(f"{name} {split.count}")
        entries = ([f"{s.removeprefix(root)}" for s in split.shards] if split.is_records
                   else [f"{p.removeprefix(root)}:{y}" for p, y in zip(
                       split.paths, split.label_sets if _several(split) else split.labels)])
        digest.update(f"\n{name}:{split.count}:".encode())
        digest.update("|".join(entries).encode())
    return f"{', '.join(counts)}; sha256 {digest.hexdigest()[:16]}"


def _several(split) -> bool:
    """Whether some image of the split has several labels (single-label data hashes as before)."""
    return any(len(label_set) > 1 for label_set in split.label_sets)


def differences(old: Dict, new: Dict) -> List[str]:
    """``field: old -> new`` for each field that differs (every field of either)."""
    old_fields, new_fields = old.get("fields", {}), new.get("fields", {})
    lines = []
    for name in sorted(set(old_fields) | set(new_fields), key=_field_order):
        before, after = old_fields.get(name, "(absent)"), new_fields.get(name, "(absent)")
        if before != after:
            lines.append(f"{name}: {json.dumps(before)} -> {json.dumps(after)}")
    return lines


def _field_order(name: str):
    order = FIELDS + ("weights_content", "global_batch", "class_names", "data")
    return (order.index(name) if name in order else len(order), name)


def check(config: config_lib.Config, data: pipeline.DatasetInfo, global_batch: int,
          info: cluster.ClusterInfo, strategy: Optional[tf.distribute.Strategy] = None) -> None:
    """Refuses a resume into a different run; records the fingerprint (chief).

    Every worker compares; only the chief writes or discards. With
    ``--discard_backups`` under MultiWorkerMirroredStrategy, every worker
    then waits for the chief's discard (one all-reduce), so that none reads a
    backup the chief is deleting.

    Raises:
      ResumeMismatch: the recorded fingerprint differs and --discard_backups is off.
    """
    path = f"{config.checkpoint_dir}/{FILE}"
    new = fingerprint(config, data, global_batch)
    old = _read(path)
    changed = differences(old, new) if old else []
    if changed and not config.discard_backups:
        raise ResumeMismatch(_refusal(config, path, changed))
    if info.is_chief:
        if changed:
            logging.warning("--discard_backups: %s holds backups of another run (%s); "
                            "deleting them and starting afresh.", config.checkpoint_dir,
                            "; ".join(changed))
            tf.io.gfile.rmtree(config.checkpoint_dir)
        elif old is None and tf.io.gfile.exists(config.checkpoint_dir):
            logging.warning("%s has backups but no %s (made before the resume guard): "
                            "resuming them unchecked, and recording this run's.",
                            config.checkpoint_dir, FILE)
        if changed or old is None:
            tf.io.gfile.makedirs(config.checkpoint_dir)
            records.write_json(path, new)
    if config.discard_backups and isinstance(strategy,
                                             tf.distribute.MultiWorkerMirroredStrategy):
        _barrier(strategy)


def _refusal(config: config_lib.Config, path: str, changed: List[str]) -> str:
    listed = "\n".join(f"  {line}" for line in changed)
    return (f"--job_dir={config.job_dir}: its backups ({config.checkpoint_dir}) are of a "
            f"different run, recorded in {path}; resuming them would mix two trainings. "
            f"What differs (recorded -> this run):\n{listed}\n"
            f"Either give a new --job_dir, or add --discard_backups to delete the old "
            f"backups and finished phases under {config.checkpoint_dir} and start afresh.")


def _read(path: str) -> Optional[Dict]:
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except tf.errors.NotFoundError:  # None yet, or the chief is discarding it right now.
        return None


def _barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns on every worker once all have reached it (an all-reduce of one scalar)."""
    @tf.function
    def all_reduce():
        per_replica = strategy.run(lambda: tf.constant(1.0))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    all_reduce()
