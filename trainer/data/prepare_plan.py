"""Planning a preparation: options, the listing of the input, splits and shards.

What :mod:`trainer.data.prepare` decides before any image is read: which
files go to which split (through :mod:`trainer.data.sources`, as the trainer
lists them), how many shards each split gets and which files each holds (a
seeded shuffle dealt round-robin), and a fingerprint of that plan, which a
re-run compares to find the output up to date.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from trainer.data import images
from trainer.data import records
from trainer.data import sources

SPLITS = sources.SPLITS
LAYOUT_SPLITS = sources.LAYOUT_SPLITS
LAYOUT_CLASS_FOLDERS = sources.LAYOUT_CLASS_FOLDERS
# Splits the trainer cannot do without: a class empty in one of them is an error.
REQUIRED_SPLITS = ("train", "validation")
_SIZE_SAMPLE = 64  # Files whose size is read to estimate a split's bytes.


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
    label_set: Tuple[int, ...] = ()  # every label's index (several: a multi-label image)


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


def join(folder: str, name: str) -> str:
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
        tuple(Source(i.path, i.relative, i.split, listed.label(i), i.class_name,
                     listed.label_set(i))
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
    multi_label = any(len(s.label_set) > 1 for s in listing.sources)
    for shard in shards:
        digest.update(f"\n{shard.path}:".encode())
        digest.update("|".join(s.relative for s in shard.sources).encode())
        if multi_label:  # Single-label plans keep their fingerprints.
            digest.update("|".join(",".join(map(str, s.label_set)) for s in shard.sources)
                          .encode())
    return digest.hexdigest()

