"""Removing what crashed writers left in a cache store: old temporary shards, never live ones.

A writer of trainer/cache_store.py puts its shards under
``<entry>/<part>/<writer token>/`` and publishes them by creating the
part's manifest, which names that token. A writer killed before it
published leaves its token folder (and on local disk perhaps a
``<part>.json.tmp-<token>`` file) that nobody reads, but that takes
space: a frozen pass can leave gigabytes. The next writer or reader of the
same part removes such leftovers (``remove_orphans``) when

* the token is not the published manifest's writer (a published entry's
  shards are never touched), and
* nothing in the folder was written for ``ORPHAN_AGE_S`` (a day): a live
  writer closes a shard every few seconds to minutes (``SHARD_BYTES`` of
  frozen outputs), and its folder is as new as its last shard, so it is
  never taken for a dead one while it writes.

A removal that races another cleaner (the folder already gone) is fine;
one that fails otherwise is a warning: the leftovers are only space.
"""

import posixpath
import time
from typing import Iterable, Optional

import tensorflow as tf
from absl import logging

ORPHAN_AGE_S = 24 * 3600


def remove_orphans(folder: str, part: str, published_writer: Optional[str],
                   max_age_s: float = ORPHAN_AGE_S) -> int:
    """Removes the unpublished leftovers of ``folder``'s ``part`` older than ``max_age_s``.

    Args:
      folder: an entry's folder (local or gs://).
      part: the part whose leftovers go (``worker-<i>-of-<n>``).
      published_writer: the token the part's manifest names, or None when
        the part is not published.
      max_age_s: how long nothing must have been written to a leftover.

    Returns:
      How many leftovers (token folders and temporary manifests) were removed.
    """
    removed = 0
    now = time.time()
    shards_root = posixpath.join(folder, part)
    for token in _children(shards_root):
        if token == published_writer:
            continue
        path = posixpath.join(shards_root, token)
        age = now - _newest(path)
        if age > max_age_s and _remove(path, tf.io.gfile.rmtree):
            logging.info("Cache: removed %s, a writer's unpublished shards (nothing written "
                         "for %.1f h).", path, age / 3600)
            removed += 1
    for name in _children(folder):
        if name.startswith(f"{part}.json.tmp-"):
            path = posixpath.join(folder, name)
            if now - _mtime(path) > max_age_s and _remove(path, tf.io.gfile.remove):
                removed += 1
    return removed


def _children(folder: str) -> Iterable[str]:
    try:
        return [name.rstrip("/") for name in tf.io.gfile.listdir(folder)]
    except tf.errors.NotFoundError:
        return []


def _mtime(path: str) -> float:
    try:
        return tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:
        return time.time()  # Unknown: taken as new, so kept.


def _newest(folder: str) -> float:
    """The latest modification time of the files under ``folder`` (seconds); of the
    folder itself while it holds none (a writer that has not closed a shard yet)."""
    times = [_mtime(posixpath.join(parent, name))
             for parent, _, names in tf.io.gfile.walk(folder) for name in names]
    return max(times) if times else _mtime(folder)


def _remove(path: str, remove) -> bool:
    try:
        remove(path)
    except tf.errors.NotFoundError:
        return False  # Another cleaner was first.
    except tf.errors.OpError as e:
        logging.warning("Cache: could not remove the leftover %s: %s", path, e)
        return False
    return True
