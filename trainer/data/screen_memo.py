"""What the pre-training check already found usable, remembered by content in --cache_dir.

trainer/data/screen.py reads and decodes every listed file before a job
trains. A tuning trial or rerun on the same data would decode the same
bytes again, to the same verdict; with ``--cache_dir`` the verdict is kept:

    <cache_dir>/screened/<listing>.json     {"settings": ..., "usable": [sha256, ...]}

``<listing>`` is the SHA-256 of the check's settings and the sorted paths,
only to find the memo again; what it holds is the SHA-256 of each file's
*content* that was a usable RGB JPEG (kept as it is). A file is skipped
undecoded only when the bytes read now hash to one of those, so an edited,
truncated or replaced file is decoded and judged afresh; files that were
skipped or converted are never remembered, so they are reported (and
converted) on every run. The settings are the check's own inputs: the pixel
limit, Pillow's version, and ``VERSION`` (bumped when trainer/data/images.py
judges differently).

A memo that cannot be read is ignored (every file decoded); one is written
under a temporary name and renamed, so a reader never sees half of one.
"""

import hashlib
import json
import posixpath
import uuid
from typing import FrozenSet, Iterable, Sequence

import PIL
import tensorflow as tf
from absl import logging

VERSION = 1
FOLDER = "screened"


def _settings(max_pixels: int) -> dict:
    return {"version": VERSION, "max_pixels": max_pixels, "pillow": PIL.__version__}


def memo_path(cache_dir: str, paths: Sequence[str], max_pixels: int) -> str:
    """Where the memo of screening ``paths`` (sorted) under ``max_pixels`` lives."""
    digest = hashlib.sha256(json.dumps(_settings(max_pixels), sort_keys=True).encode())
    for path in paths:
        digest.update(path.encode() + b"\n")
    return posixpath.join(cache_dir.rstrip("/"), FOLDER, digest.hexdigest() + ".json")


def load(path: str, max_pixels: int) -> FrozenSet[str]:
    """Content digests (hex) known usable as they are; empty when there is no memo."""
    try:
        if not tf.io.gfile.exists(path):
            return frozenset()
        with tf.io.gfile.GFile(path) as f:
            memo = json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        logging.warning("Screening memo %s unreadable (%s): checking every file.", path, e)
        return frozenset()
    if not isinstance(memo, dict) or memo.get("settings") != _settings(max_pixels):
        logging.warning("Screening memo %s is of other settings: checking every file.", path)
        return frozenset()
    return frozenset(memo.get("usable", ()))


def save(path: str, usable: Iterable[str], max_pixels: int) -> None:
    """Writes the memo whole (a temporary file, then a rename over any older one)."""
    data = json.dumps({"settings": _settings(max_pixels), "usable": sorted(usable)})
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tf.io.gfile.makedirs(posixpath.dirname(path))
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(data)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except tf.errors.OpError as e:  # Only a memo: the next run checks every file.
        logging.warning("Screening memo %s not written: %s", path, e)
