"""A cache-store writer in a process of its own, for tests/test_cache_store.py.

    python tests/cache_writer.py ROOT MODE [START_FILE]

Writes one entry of ``KEY`` (six batches of known arrays, one shard each)
under ROOT, then publishes it and prints a JSON line: the published
writer's token and whether the entry read back equals ``expected()``.
MODE ``publish``: straight through; ``hang_in_shards``: stops for good
after three shards (printing ``WRITING``), to be killed mid-write;
``hang_before_link``: stops after the complete temporary manifest is
written, just before it is linked into place (local disk); ``race``: waits
for START_FILE to appear, then writes with short pauses (two such
processes fill one key at once).
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import sys
import time

import numpy as np

from trainer import cache_key
from trainer import cache_store

KEY = cache_key.make_key("frontier", "original", "demo_cnn", "weights", 32, 5,
                         {"train": "listing"})
PART = cache_store.part_name(0, 1)
BATCHES = 6


def batch(index):
    """Batch ``index``: two outputs (float32 and float16) and int32 labels."""
    base = np.arange(4 * 3 * 3 * 2, dtype=np.float32).reshape(4, 3, 3, 2) + 1000 * index
    labels = np.arange(4, dtype=np.int32) + index
    return [base, (base[:, :1, :1, :1] / 7).astype(np.float16)], labels


def expected():
    batches = [batch(i) for i in range(BATCHES)]
    return ([np.concatenate([b[0][k] for b in batches]) for k in range(2)],
            np.concatenate([b[1] for b in batches]))


def matches(entry) -> bool:
    outputs, labels = entry.arrays("train")
    want_outputs, want_labels = expected()
    return (all(o.dtype.as_numpy_dtype == w.dtype and np.array_equal(o.numpy(), w)
                for o, w in zip(outputs, want_outputs))
            and np.array_equal(labels, want_labels))


def main(root, mode, start_file=None):
    cache_store.SHARD_BYTES = 1  # A shard per record: kills land between complete shards.
    if mode == "race":
        while not os.path.exists(start_file):
            time.sleep(0.01)
    writer = cache_store.Store(root).writer(KEY, PART)
    for index in range(BATCHES):
        writer.add("train", *batch(index))
        if mode == "hang_in_shards" and index == 2:
            print("WRITING", flush=True)
            time.sleep(600)
        if mode == "race":
            time.sleep(0.05)
    if mode == "hang_before_link":
        def hang(*args):
            print("LINKING", flush=True)
            time.sleep(600)
        os.link = hang
    entry = writer.publish()
    print(json.dumps({"writer": entry.manifest["writer"], "own": writer.token,
                      "matches": matches(entry)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
