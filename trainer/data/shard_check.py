"""Prepared shards that are missing, truncated or corrupt: clear errors naming the file.

TensorFlow reports a damaged TFRecord as ``DataLossError: corrupted record at
2044`` (or ``truncated record at ...``), without the file, and only when a
pipeline reaches it, mid-epoch. So:

* ``check_shards``, before training (``pipeline.describe``): every shard the
  manifest names must exist, and, where the manifest records its size
  (``shard_sizes``, written by ``trainer.prepare`` since issue 15), have that
  size. One ``stat`` per shard, in parallel threads: a truncated copy or a
  missing upload is an error before any image is read.
* ``naming_corrupt_shards``, around training: a record whose checksum fails
  cannot be found without reading every byte, so it is left to surface as
  TensorFlow's DataLossError; this context then reads the shards one by one
  to find the damaged ones and raises a DataError naming them. Reading them
  all again happens only on that failure.
"""

import concurrent.futures
import contextlib
from typing import Dict, List, Sequence

import tensorflow as tf

from trainer.data import records
from trainer.data import sources

_THREADS = 16  # Stats wait on storage.
_WAY_OUT = ("re-run trainer.prepare with --overwrite into a fresh --output_dir, or copy "
            "the shard again")


def check_shards(root: str, manifest: Dict) -> None:
    """Raises DataError naming each listed shard that is missing or of the wrong size."""
    expected = {}
    for split in manifest["splits"].values():
        sizes = split.get("shard_sizes", {})
        for shard in split["shards"]:
            expected[shard] = sizes.get(shard)

    def problem(shard):
        path = f"{root}/{shard}"
        try:
            length = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            return f"{path}: missing (listed in {root}/{records.MANIFEST})"
        if expected[shard] is not None and length != expected[shard]:
            return (f"{path}: {length} bytes, the manifest records {expected[shard]} "
                    f"(truncated or replaced)")
        return ""

    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        problems = [p for p in pool.map(problem, sorted(expected)) if p]
    if problems:
        raise sources.DataError(f"Prepared data {root} is damaged: " + "; ".join(problems)
                                + f". To repair: {_WAY_OUT}.")


def find_corrupt(shards: Sequence[str]) -> List[str]:
    """'path: what TensorFlow says' for each shard that does not read through."""
    damaged = []
    for shard in shards:
        try:
            for _ in tf.data.TFRecordDataset(shard, buffer_size=1 << 20):
                pass
        except tf.errors.DataLossError as e:
            damaged.append(f"{shard}: {e.message.split('}}')[-1].split('[Op:')[0].strip()}")
    return damaged


@contextlib.contextmanager
def naming_corrupt_shards(data_dir: str):
    """Turns a DataLossError from prepared data into a DataError naming the damaged shards."""
    try:
        yield
    except tf.errors.DataLossError as error:
        shards = _shards_of(data_dir)
        damaged = find_corrupt(shards) if shards else []
        if not damaged:
            raise
        raise sources.DataError(
            f"Corrupt TFRecord shard(s) in {data_dir}: {'; '.join(damaged)}. "
            f"To repair: {_WAY_OUT}.") from error


def _shards_of(data_dir: str) -> List[str]:
    if not data_dir or sources.detect_layout(data_dir) != sources.LAYOUT_RECORDS:
        return []
    root = data_dir.rstrip("/")
    manifest = records.read_manifest(root)
    return [f"{root}/{shard}" for split in manifest["splits"].values()
            for shard in split["shards"]]
