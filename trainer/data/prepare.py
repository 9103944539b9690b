"""Images as users have them (local or gs://) -> validated, converted, sharded TFRecords,
a report, a manifest.

The input is anything :mod:`trainer.data.sources` lists, the module that
lists the trainer's ``--data_dir`` too, so both split alike, image for image:

* ``train/`` and ``validation/`` (optionally ``test/``, and their aliases) of
  class-named subfolders (layout ``splits``),
* class-named subfolders alone (layout ``class_folders``), split per class by
  ``split_fractions`` and the seed,
* Vertex AI import files, .csv or .jsonl (layout ``import_files``); bad rows
  are reported with their line (``--strict`` fails on the first).

Without any test image, ``test_fraction`` of each validation class is held
out as test, as the trainer does.

Steps: list every file -> assign splits -> plan shards (a seeded shuffle,
dealt round-robin, so every shard mixes all classes) -> write the shards in
parallel threads, each file read (with read-ahead), decoded in full and
converted as needed by :mod:`trainer.data.images` -> report -> manifest.
Threads rather than processes: Pillow's decoders and encoders and hashlib
release the GIL, reads wait on I/O, and worker processes would each have to
import TensorFlow (or be forked from a process running its threads).

Idempotent: the manifest records a fingerprint of the plan (input listing,
splits, shards, options); when it matches and every shard is there, a
re-run writes nothing. Otherwise the old manifest is removed first, shards
are written under temporary names and renamed when complete, leftovers of
interrupted runs (temporary files, shards of another plan) are removed, and
the manifest is written last: its presence means the shards are complete.
"""

import concurrent.futures
from typing import Sequence

import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.data import records
from trainer.data import shard_check
from trainer.data import sources
from trainer.data.prepare_output import (Progress, build_manifest, build_report, log_summary,
                                         remove_leftovers, write_shard)
from trainer.data.prepare_plan import (  # noqa: F401 (re-exported: the public names)
                                       LAYOUT_CLASS_FOLDERS, LAYOUT_SPLITS,
                                       REQUIRED_SPLITS, SPLITS, Listing, Options, PrepareError,
                                       Result, Shard, Source, assign_splits, fingerprint, join,
                                       list_input, plan_shards)


def _is_up_to_date(output_dir: str, plan_fingerprint: str, shards: Sequence[Shard]) -> bool:
    try:
        manifest = records.read_manifest(output_dir)
    except (tf.errors.NotFoundError, ValueError):
        return False
    if manifest.get("source", {}).get("fingerprint") != plan_fingerprint:
        return False
    try:  # Every shard there, at its recorded size: a truncated one is written again.
        shard_check.check_shards(output_dir, manifest)
    except sources.DataError:
        return False
    return True


def _check_folders(input_dir: str, output_dir: str) -> None:
    # Writing inside the input would make the shards part of the next listing.
    inside = (output_dir + "/").startswith(input_dir + "/")
    if inside:
        raise PrepareError(f"output_dir {output_dir!r} must not be inside input_dir "
                           f"{input_dir!r}.")


def prepare(input_dir: str, output_dir: str, options: Options = Options()) -> Result:
    """Prepares ``input_dir`` into ``output_dir``; see the module docstring.

    Args:
      input_dir: image folders, local or gs://.
      output_dir: where shards, report and manifest go, local or gs://.
      options: how.

    Returns:
      The Result. ``result.ok`` is False when nothing usable is left or a
      class has no usable image in train or validation; the report (always
      written) says why, and no manifest is written.

    Raises:
      PrepareError: the input has no usable layout or an option is invalid.
    """
    with storage.explain_failures(
            f"Preparing {input_dir} into {output_dir}",
            "The manifest is written only after every shard, so the folder is never "
            "taken for data it does not hold; re-run the same command."):
        return _prepare(input_dir, output_dir, options)


def _prepare(input_dir: str, output_dir: str, options: Options) -> Result:
    options.validate()
    input_dir, output_dir = input_dir.rstrip("/"), output_dir.rstrip("/")
    _check_folders(input_dir, output_dir)
    listing = list_input(input_dir, options)
    splits = assign_splits(listing, options)
    workers = options.num_workers
    with concurrent.futures.ThreadPoolExecutor(max(8, 4 * workers)) as read_pool:
        shards = plan_shards(splits, options, read_pool)
        plan_fingerprint = fingerprint(listing, shards, options)
        if not options.overwrite and _is_up_to_date(output_dir, plan_fingerprint, shards):
            logging.info("%s is up to date with %s; nothing to do.", output_dir, input_dir)
            return Result(records.read_manifest(output_dir), {"errors": []}, up_to_date=True)
        logging.info("Preparing %d files of %d classes into %d shards with %d workers.",
                     len(listing.sources), len(listing.class_names), len(shards), workers)
        tf.io.gfile.makedirs(output_dir)
        manifest_path = join(output_dir, records.MANIFEST)
        if tf.io.gfile.exists(manifest_path):
            tf.io.gfile.remove(manifest_path)  # It no longer describes what is here.
        remove_leftovers(output_dir, shards)
        for split in splits:
            tf.io.gfile.makedirs(join(output_dir, split))
        progress = Progress(len(listing.sources), options.progress)
        with concurrent.futures.ThreadPoolExecutor(workers) as shard_pool:
            outcomes_by_shard = list(shard_pool.map(
                lambda shard: write_shard(shard, output_dir, options, read_pool, progress),
                shards))
        shard_sizes = dict(zip((s.path for s in shards), read_pool.map(
            lambda shard: tf.io.gfile.stat(join(output_dir, shard.path)).length, shards)))
    outcomes = [o for shard_outcomes in outcomes_by_shard for o in shard_outcomes]
    report = build_report(input_dir, output_dir, listing, splits, outcomes)
    report_path = join(output_dir, records.REPORT)
    records.write_json(report_path, report)
    log_summary(report, report_path)
    if report["errors"]:
        return Result(None, report)
    manifest = build_manifest(input_dir, listing, shards, outcomes_by_shard, options,
                              plan_fingerprint, shard_sizes)
    records.write_manifest(output_dir, manifest)
    logging.info("Wrote %s.", manifest_path)
    return Result(records.read_manifest(output_dir), report)
