"""Writing a planned preparation: shards (in parallel threads), the report, the manifest.

Each shard is written under a temporary name by one thread, its files read
ahead in a shared pool, decoded in full and converted as needed by
:mod:`trainer.data.images`, then renamed when complete. The report names
every skipped and converted file and any leakage across splits; the
manifest (format in :mod:`trainer.data.records`) describes complete shards.
"""

import collections
import dataclasses
import hashlib
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer.data import images
from trainer.data import records
from trainer.data.prepare_plan import (REQUIRED_SPLITS, SPLITS, Listing, Options, Shard,
                                       Source, join)

_READ_AHEAD = 8  # Files read ahead of decoding, per shard writer.


class Progress:
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
    names = [source.class_name] if len(source.label_set) < 2 else None
    return {"path": source.path, "split": source.split, "class": source.class_name,
            "labels": names or list(source.label_set),
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
        checked.width, source.relative, sha256, source.label_set)
    return example, _outcome(source, checked.status, checked.reason, sha256, checked.height,
                             checked.width, len(checked.encoded))


def write_shard(shard: Shard, output_dir: str, options: Options, read_pool,
                 progress: Progress) -> List[Dict]:
    """Writes one shard under a temporary name, then renames it; returns its outcomes."""
    final = join(output_dir, shard.path)
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


def remove_leftovers(output_dir: str, shards: Sequence[Shard]) -> None:
    """Removes temporary files of interrupted runs and shards of other plans.

    Only names this module writes are touched; anything else stays.
    """
    planned = {join(output_dir, s.path) for s in shards}
    for folder in [output_dir] + [join(output_dir, split) for split in SPLITS]:
        if not tf.io.gfile.isdir(folder):
            continue
        for name in tf.io.gfile.listdir(folder):
            name = name.rstrip("/")
            path = join(folder, name)
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
        (o["split"], name) for o in outcomes if o["status"] != images.SKIPPED
        for name in _class_names(o, listing))
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
            for name in _class_names(o, listing):
                entry["classes"][name] += 1
    kept = [o for outcomes in outcomes_by_shard for o in outcomes
            if o["status"] != images.SKIPPED]
    return {
        "class_names": list(listing.class_names),
        "multi_label": any(len(s.label_set) > 1 for s in listing.sources),
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


def _class_names(outcome: Dict, listing: Listing) -> List[str]:
    """Every class of an outcome's image (a multi-label image's ``labels`` are indices)."""
    labels = outcome["labels"]
    return [listing.class_names[k] if isinstance(k, int) else k for k in labels]


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

