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

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.data import images
from trainer.data import records
from trainer.data import shard_check
from trainer.data import sources

SPLITS = sources.SPLITS
# Splits the trainer cannot do without: a class empty in one of them is an error.
REQUIRED_SPLITS = ("train", "validation")
LAYOUT_SPLITS = sources.LAYOUT_SPLITS
LAYOUT_CLASS_FOLDERS = sources.LAYOUT_CLASS_FOLDERS
_SIZE_SAMPLE = 64  # Files whose size is read to estimate a split's bytes.
_READ_AHEAD = 8  # Files read ahead of decoding, per shard writer.


class PrepareError(ValueError):
    """The input cannot be prepared at all (no folders, bad options)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How to prepare; every field is a flag of ``trainer.prepare``."""

    min_shards: int = 8
    shard_bytes: int = 150 * 2**20
    workers: int = 0
    max_side: int = 0
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    split_fractions: Tuple[float, float, float] = sources.DEFAULT_FRACTIONS
    test_fraction: float = 0.2
    seed: int = 42
    strict: bool = False
    flatten_nested: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raises PrepareError naming the first option that cannot work."""
        checks = [
            ("min_shards", self.min_shards >= 1, "must be at least 1"),
            ("shard_bytes", self.shard_bytes >= 1, "must be positive"),
            ("workers", self.workers >= 0, "must be 0 (one per CPU) or more"),
            ("max_side", self.max_side >= 0, "must be 0 (no limit) or more"),
            ("max_image_pixels", self.max_image_pixels >= 1, "must be at least 1"),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in [1, 100]"),
            ("split_fractions", len(self.split_fractions) == 3
             and min(self.split_fractions) >= 0 and min(self.split_fractions[:2]) > 0
             and abs(sum(self.split_fractions) - 1) < 1e-6,
             "must be train,validation,test fractions, train and validation above 0, "
             "summing to 1"),
            ("test_fraction", 0.0 <= self.test_fraction < 1.0, "must be in [0, 1)"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise PrepareError(f"{name}={getattr(self, name)!r} {message}.")

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def source_options(self) -> sources.Options:
        return sources.Options(tuple(self.split_fractions), self.test_fraction, self.seed,
                               self.strict, self.flatten_nested)


@dataclasses.dataclass(frozen=True)
class Source:
    """One listed file and where it goes."""

    path: str
    relative: str
    split: str
    label: int
    class_name: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """What the input holds: classes, files with their splits, stray files, bad rows."""

    layout: str
    class_names: Tuple[str, ...]
    sources: Tuple[Source, ...]
    stray: Tuple[str, ...]
    bad_rows: Tuple[sources.Problem, ...] = ()


@dataclasses.dataclass(frozen=True)
class Shard:
    """One planned shard: its path relative to the output and its files, in order."""

    split: str
    path: str
    sources: Tuple[Source, ...]


@dataclasses.dataclass
class Result:
    """What a run did: the manifest (None on errors), the report, and the errors."""

    manifest: Optional[Dict]
    report: Dict
    up_to_date: bool = False

    @property
    def errors(self) -> List[str]:
        return self.report.get("errors", [])

    @property
    def ok(self) -> bool:
        return not self.errors


# -------------------------------------------------------------------- Listing


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name.rstrip('/')}"


def list_input(input_dir: str, options: "Options" = None) -> Listing:
    """Lists every file of the input by split and class (through :mod:`sources`).

    Files inside class folders are listed whatever their name (each is
    validated later), except hidden files and OS droppings; anything else is
    reported as stray.
    """
    options = options or Options()
    try:
        layout = sources.detect_layout(input_dir)
        if layout == sources.LAYOUT_RECORDS:
            raise PrepareError(f"input_dir {input_dir!r} holds a {records.MANIFEST}: it is "
                               "already prepared; point the trainer's --data_dir at it.")
        listed = sources.list_images(input_dir, options.source_options())
    except sources.DataError as e:
        raise PrepareError(f"input_dir: {e}") from None
    return Listing(
        listed.layout, listed.class_names,
        tuple(Source(i.path, i.relative, i.split, listed.label(i), i.class_name)
              for i in listed.images),
        listed.stray, listed.bad_rows)


# ------------------------------------------------------------- Splits, shards


def assign_splits(listing: Listing, options: Options) -> Dict[str, List[Source]]:
    """Files of each split, as the listing assigned them (train and validation always)."""
    del options  # The listing has split them already (sources._assign).
    splits = {name: [s for s in listing.sources if s.split == name] for name in SPLITS}
    return {name: files for name, files in splits.items() if files or name in REQUIRED_SPLITS}


def _estimate_bytes(sources: Sequence[Source], pool) -> int:
    """A split's bytes, from the sizes of an evenly spread sample of its files."""
    if not sources:
        return 0
    step = max(1, len(sources) // _SIZE_SAMPLE)
    sample = list(sources[::step])[:_SIZE_SAMPLE]

    def size(source):
        try:
            return tf.io.gfile.stat(source.path).length
        except tf.errors.OpError:
            return 0

    sizes = list(pool.map(size, sample))
    return int(sum(sizes) / len(sizes) * len(sources))


def plan_shards(splits: Dict[str, List[Source]], options: Options, pool) -> List[Shard]:
    """Shards of every split: enough to stay under shard_bytes, at least min_shards.

    A split with fewer files than min_shards gets one shard per file: no
    shard is ever empty.
    """
    shards = []
    for split, sources in splits.items():
        if not sources:
            continue
        wanted = math.ceil(_estimate_bytes(sources, pool) / options.shard_bytes)
        count = min(len(sources), max(options.min_shards, wanted))
        order = list(sources)
        random.Random(f"{options.seed}/{split}").shuffle(order)
        for index in range(count):
            shards.append(Shard(split, records.shard_path(split, index, count),
                                tuple(order[index::count])))
    return shards


def fingerprint(listing: Listing, shards: Sequence[Shard], options: Options) -> str:
    """A hash of everything that decides the output: what a re-run compares."""
    digest = hashlib.sha256()
    settings = {"format_version": records.FORMAT_VERSION, "layout": listing.layout,
                "class_names": listing.class_names, "max_side": options.max_side,
                "jpeg_quality": options.jpeg_quality}
    if options.max_image_pixels != images.DEFAULT_MAX_PIXELS:  # Older plans stay up to date.
        settings["max_image_pixels"] = options.max_image_pixels
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for shard in shards:
        digest.update(f"\n{shard.path}:".encode())
        digest.update("|".join(s.relative for s in shard.sources).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------- Writing


class _Progress:
    """A one-line progress bar on a terminal, else a log line every 10 s."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.tty = sys.stderr.isatty()

    def advance(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.enabled and (now - self.last >= (0.2 if self.tty else 10.0)
                                 or self.done == self.total):
                self.last = now
                self._show(now)

    def _show(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-6)
        if self.tty:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"files, {rate:.0f}/s" + ("\n" if self.done == self.total else ""))
            sys.stderr.flush()
        else:
            logging.info("Prepared %d/%d files (%.0f/s).", self.done, self.total, rate)


def _read(path: str):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.OpError, OSError) as e:
        return e


def _read_ahead(pool, sources: Sequence[Source]) -> Iterator[Tuple[Source, object]]:
    """(source, bytes or the read error) in order, with reads running ahead in ``pool``."""
    pending = collections.deque()
    for source in sources:
        pending.append((source, pool.submit(_read, source.path)))
        if len(pending) > _READ_AHEAD:
            done_source, future = pending.popleft()
            yield done_source, future.result()
    while pending:
        done_source, future = pending.popleft()
        yield done_source, future.result()


def _outcome(source: Source, status: str, reason: str = "", sha256: str = "",
             height: int = 0, width: int = 0, size: int = 0) -> Dict:
    return {"path": source.path, "split": source.split, "class": source.class_name,
            "status": status, "reason": reason, "sha256": sha256,
            "height": height, "width": width, "bytes": size}


def _example(source: Source, data, options: Options):
    """(tf.train.Example or None, outcome) for one file."""
    if isinstance(data, Exception):
        message = getattr(data, "message", str(data)).splitlines()[0]
        return None, _outcome(source, images.SKIPPED, f"cannot read: {message}")
    sha256 = hashlib.sha256(data).hexdigest()
    checked = images.check_image(data, options.max_side, options.jpeg_quality,
                                 options.max_image_pixels)
    if checked.status == images.SKIPPED:
        return None, _outcome(source, images.SKIPPED, checked.reason, sha256)
    example = records.make_example(
        checked.encoded, records.JPEG, source.label, source.class_name, checked.height,
        checked.width, source.relative, sha256)
    return example, _outcome(source, checked.status, checked.reason, sha256, checked.height,
                             checked.width, len(checked.encoded))


def _write_shard(shard: Shard, output_dir: str, options: Options, read_pool,
                 progress: _Progress) -> List[Dict]:
    """Writes one shard under a temporary name, then renames it; returns its outcomes."""
    final = _join(output_dir, shard.path)
    temp = records.temporary_name(final)
    outcomes = []
    with tf.io.TFRecordWriter(temp) as writer:
        for source, data in _read_ahead(read_pool, shard.sources):
            example, outcome = _example(source, data, options)
            if example is not None:
                writer.write(example.SerializeToString())
            outcomes.append(outcome)
            progress.advance()
    tf.io.gfile.rename(temp, final, overwrite=True)
    return outcomes


def _remove_leftovers(output_dir: str, shards: Sequence[Shard]) -> None:
    """Removes temporary files of interrupted runs and shards of other plans.

    Only names this module writes are touched; anything else stays.
    """
    planned = {_join(output_dir, s.path) for s in shards}
    for folder in [output_dir] + [_join(output_dir, split) for split in SPLITS]:
        if not tf.io.gfile.isdir(folder):
            continue
        for name in tf.io.gfile.listdir(folder):
            name = name.rstrip("/")
            path = _join(folder, name)
            match = records.SHARD_NAME.match(name)
            is_temp_json = name.startswith((records.MANIFEST, records.REPORT)) and ".tmp-" in name
            if (match and (match["temp"] or path not in planned)) or is_temp_json:
                tf.io.gfile.remove(path)


# ---------------------------------------------------------- Report, manifest


def _stats(values: Sequence[int]) -> Dict:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 1)}


def _duplicates(outcomes: Sequence[Dict]) -> Tuple[List[Dict], List[Dict]]:
    """(groups spanning splits: leakage, groups within one split) of identical files."""
    by_hash = collections.defaultdict(list)
    for o in outcomes:
        if o["status"] != images.SKIPPED:
            by_hash[o["sha256"]].append(o)
    leakage, duplicates = [], []
    for sha256, group in sorted(by_hash.items()):
        if len(group) < 2:
            continue
        files = [{"split": o["split"], "path": o["path"]} for o in group]
        target = leakage if len({o["split"] for o in group}) > 1 else duplicates
        target.append({"sha256": sha256, "files": files})
    return leakage, duplicates


def build_report(input_dir: str, output_dir: str, listing: Listing,
                 splits: Dict[str, List[Source]], outcomes: Sequence[Dict]) -> Dict:
    """The report: every skipped and converted file with its reason, leakage, errors."""
    def entries(status):
        return [{k: o[k] for k in ("path", "split", "class", "reason")}
                for o in outcomes if o["status"] == status]

    written = collections.Counter(
        (o["split"], o["class"]) for o in outcomes if o["status"] != images.SKIPPED)
    empty = {split: [c for c in listing.class_names if not written[(split, c)]]
             for split in splits}
    empty = {split: names for split, names in empty.items() if names}
    errors = []
    if not sum(written.values()):
        errors.append("No usable image in the input.")
    for split in REQUIRED_SPLITS:
        for class_name in empty.get(split, []):
            errors.append(f"Class {class_name!r} has no usable image in {split}.")
    leakage, duplicates = _duplicates(outcomes)
    skipped, converted = entries(images.SKIPPED), entries(images.CONVERTED)
    skipped += [{"path": p, "split": "", "class": "", "reason": "not in a class folder"}
                for p in listing.stray]
    bad_rows = [{"where": p.where, "reason": p.reason} for p in listing.bad_rows]
    return {
        "input_dir": input_dir, "output_dir": output_dir, "layout": listing.layout,
        "summary": {"files": len(outcomes) + len(listing.stray),
                    "written": sum(written.values()), "converted": len(converted),
                    "skipped": len(skipped), "bad_rows": len(bad_rows),
                    "leakage_groups": len(leakage),
                    "duplicate_groups": len(duplicates)},
        "skipped": skipped, "converted": converted, "bad_rows": bad_rows, "leakage": leakage,
        "duplicates": duplicates, "empty_classes": empty, "errors": errors,
    }


def build_manifest(input_dir: str, listing: Listing, shards: Sequence[Shard],
                   outcomes_by_shard: Sequence[List[Dict]], options: Options,
                   plan_fingerprint: str, shard_sizes: Optional[Dict[str, int]] = None) -> Dict:
    """The manifest of a complete run (format in :mod:`trainer.data.records`).

    ``shard_sizes``: each shard's file size in bytes, which the trainer checks
    before training (trainer/data/shard_check.py).
    """
    splits = {}
    for shard, outcomes in zip(shards, outcomes_by_shard):
        kept = [o for o in outcomes if o["status"] != images.SKIPPED]
        entry = splits.setdefault(shard.split, {
            "count": 0, "bytes": 0, "shards": [], "shard_sizes": {},
            "classes": {name: 0 for name in listing.class_names}})
        entry["count"] += len(kept)
        entry["bytes"] += sum(o["bytes"] for o in kept)
        entry["shards"].append(shard.path)
        if shard_sizes:
            entry["shard_sizes"][shard.path] = shard_sizes[shard.path]
        for o in kept:
            entry["classes"][o["class"]] += 1
    kept = [o for outcomes in outcomes_by_shard for o in outcomes
            if o["status"] != images.SKIPPED]
    return {
        "class_names": list(listing.class_names),
        "splits": splits,
        "image_stats": {"height": _stats([o["height"] for o in kept]),
                        "width": _stats([o["width"] for o in kept]),
                        "encoded_bytes": _stats([o["bytes"] for o in kept])},
        "source": {"input_dir": input_dir, "layout": listing.layout,
                   "files": len(listing.sources), "fingerprint": plan_fingerprint},
        "options": {k: v for k, v in dataclasses.asdict(options).items()
                    if k not in ("workers", "overwrite", "progress")},
        "report": records.REPORT,
    }


def log_summary(report: Dict, report_path: str, limit: int = 10) -> None:
    """The report in a few log lines; the JSON file has every entry."""
    summary = report["summary"]
    logging.info("%d files: %d written (%d converted), %d skipped.", summary["files"],
                 summary["written"], summary["converted"], summary["skipped"])
    for entry in report["bad_rows"][:limit]:
        logging.warning("  bad row %s: %s", entry["where"], entry["reason"])
    for kind in ("skipped", "converted"):
        for entry in report[kind][:limit]:
            logging.info("  %s %s: %s", kind, entry["path"], entry["reason"])
        if len(report[kind]) > limit:
            logging.info("  ... %d more %s, see the report.", len(report[kind]) - limit, kind)
    for group in report["leakage"][:limit]:
        logging.warning("Leakage: identical images in %s.",
                        ", ".join(f"{f['split']}:{f['path']}" for f in group["files"]))
    for split, names in report["empty_classes"].items():
        logging.warning("No usable image of %s in %s.", names, split)
    for error in report["errors"]:
        logging.error("%s", error)
    logging.info("Report: %s", report_path)


# ------------------------------------------------------------------- The run


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
        manifest_path = _join(output_dir, records.MANIFEST)
        if tf.io.gfile.exists(manifest_path):
            tf.io.gfile.remove(manifest_path)  # It no longer describes what is here.
        _remove_leftovers(output_dir, shards)
        for split in splits:
            tf.io.gfile.makedirs(_join(output_dir, split))
        progress = _Progress(len(listing.sources), options.progress)
        with concurrent.futures.ThreadPoolExecutor(workers) as shard_pool:
            outcomes_by_shard = list(shard_pool.map(
                lambda shard: _write_shard(shard, output_dir, options, read_pool, progress),
                shards))
        shard_sizes = dict(zip((s.path for s in shards), read_pool.map(
            lambda shard: tf.io.gfile.stat(_join(output_dir, shard.path)).length, shards)))
    outcomes = [o for shard_outcomes in outcomes_by_shard for o in shard_outcomes]
    report = build_report(input_dir, output_dir, listing, splits, outcomes)
    report_path = _join(output_dir, records.REPORT)
    records.write_json(report_path, report)
    log_summary(report, report_path)
    if report["errors"]:
        return Result(None, report)
    manifest = build_manifest(input_dir, listing, shards, outcomes_by_shard, options,
                              plan_fingerprint, shard_sizes)
    records.write_manifest(output_dir, manifest)
    logging.info("Wrote %s.", manifest_path)
    return Result(records.read_manifest(output_dir), report)
