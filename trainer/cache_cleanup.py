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

A job without ``--cache_dir`` spills to a scratch folder of its own on
local disk, removed when the job ends; a job killed (kill -9, out of
memory) leaves it. ``scratch_folder`` names each scratch folder after its
host and process, and first removes the folders of this host whose process
is gone (``remove_dead_scratch``); a folder of a live process, of another
host, or not named so is left alone.

A removal that races another cleaner (the folder already gone) is fine;
one that fails otherwise is a warning: the leftovers are only space.
"""

import os
import posixpath
import re
import shutil
import socket
import tempfile
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


SCRATCH_PREFIX = "frozen_work_"


def scratch_folder(parent: str = "") -> str:
    """A new scratch folder under ``parent`` ("": the system's temporary folder), named
    ``frozen_work_<host>_<pid>_...``, after removing those of dead processes of this host."""
    parent = parent or tempfile.gettempdir()
    remove_dead_scratch(parent)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host()}_{os.getpid()}_", dir=parent)


def remove_dead_scratch(parent: str) -> int:
    """Removes the scratch folders under ``parent`` of this host's processes that are gone.

    Returns:
      How many were removed.
    """
    # <prefix><host>_<pid>_<mkdtemp's random part, which may hold "_">
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}([^_]+)_(\d+)_.+$")
    removed = 0
    for name in (os.listdir(parent) if os.path.isdir(parent) else ()):
        match = pattern.match(name)
        if not match or match.group(1) != _host() or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, name)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue  # Another job's cleanup was first.
        except OSError as e:
            logging.warning("Cache: could not remove the dead job's scratch folder %s: %s",
                            path, e)
            continue
        logging.info("Cache: removed %s, the spill folder of a job that ended without "
                     "removing it (process %s is gone).", path, match.group(2))
        removed += 1
    return removed


def _host() -> str:
    """This host's name, as scratch folder names hold it (no "_", which separates fields)."""
    return socket.gethostname().replace("_", "-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's process: alive.
    return True
