"""The cache store: entries read back exactly, a partial entry is never read, one writer wins.

Writers run in processes of their own (tests/cache_writer.py), killed with
SIGKILL mid-write, on local disk and on the Cloud Storage emulator behind
TensorFlow's own gs:// client.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cache_writer  # tests/cache_writer.py
from trainer import cache_cleanup
from trainer import cache_store

HERE = os.path.dirname(os.path.abspath(__file__))


def _writer(root, mode, *args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "cache_writer.py"), str(root),
                             mode, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ),
                            cwd=os.path.dirname(HERE))


def _result(process):
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def _files(root):
    return sorted(f"{folder}/{name}" for folder, _, names in tf.io.gfile.walk(str(root))
                  for name in names)


def _store(root):
    return cache_store.Store(str(root))


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("gcs_dir") + "/cache"


def _publish(root):
    """Fills KEY in this process; returns the entry as a fresh lookup reads it."""
    writer = _store(root).writer(cache_writer.KEY, cache_writer.PART)
    for index in range(cache_writer.BATCHES):
        writer.add("train", *cache_writer.batch(index))
    writer.publish()
    entry = _store(root).lookup(cache_writer.KEY, cache_writer.PART)
    assert cache_writer.matches(entry)
    return entry


@pytest.fixture
def one_record_per_shard(monkeypatch):
    monkeypatch.setattr(cache_store, "SHARD_BYTES", 1)


def test_published_entry_reads_back_exactly_in_its_dtypes(root, one_record_per_shard):
    entry = _publish(root)
    assert entry.specs == [((3, 3, 2), "float32"), ((1, 1, 1), "float16")]
    assert len(entry.paths("train")) == cache_writer.BATCHES  # One shard per record here.
    assert entry.bytes_per_image() == 3 * 3 * 2 * 4 + 2


@pytest.mark.parametrize("stage", ["hang_in_shards", "hang_before_link"])
def test_a_writer_killed_mid_write_leaves_nothing_that_is_read(root, stage,
                                                              one_record_per_shard):
    if stage == "hang_before_link" and root.startswith("gs://"):
        pytest.skip("gs:// publishes the manifest in one upload: no temporary file")
    process = _writer(root, stage)
    assert process.stdout.readline().strip() in ("WRITING", "LINKING")
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = _files(root)
    assert any(name.endswith(".tfrecord") for name in left)  # It died with shards written.
    assert _store(root).lookup(cache_writer.KEY, cache_writer.PART) is None
    # The next writer fills the key whole; the dead one's files are never read.
    entry = _publish(root)
    assert not set(entry.paths("train")) & set(left)


def test_two_processes_filling_one_key_at_once_one_wins(root, tmp_path):
    start = tmp_path / "start"
    processes = [_writer(root, "race", start) for _ in range(2)]
    start.write_text("go")
    results = [_result(p) for p in processes]
    assert all(r["matches"] for r in results)  # Each read a whole entry...
    assert results[0]["writer"] == results[1]["writer"]  # ...the same one: one won.
    winner = results[0]["writer"]
    assert {r["own"] for r in results} == {winner, next(r["own"] for r in results
                                                        if r["own"] != winner)}
    files = _files(root)
    manifests = [f for f in files if f.endswith(".json")]
    assert len(manifests) == 1 and not [f for f in files if ".tmp-" in f]
    # The loser removed its shards: only the winner's remain.
    assert all(f"/{winner}/" in f for f in files if f.endswith(".tfrecord"))


def test_an_entry_with_a_shard_cut_short_or_of_another_key_is_not_read(tmp_path,
                                                                       one_record_per_shard):
    store = _store(tmp_path / "cache")
    entry = _publish(tmp_path / "cache")
    shard = entry.paths("train")[-1]
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[:-3])
    assert store.lookup(cache_writer.KEY, cache_writer.PART) is None
    with open(shard, "wb") as f:
        f.write(data)
    assert store.lookup(cache_writer.KEY, cache_writer.PART) is not None
    # A manifest written for another key, at this key's place (a stale entry).
    manifest_path = os.path.join(entry.folder, f"{cache_writer.PART}.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["key"]["image_size"] = 48
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert store.lookup(cache_writer.KEY, cache_writer.PART) is None


def test_same_shapes_get_the_same_shards(tmp_path):
    """An image's and its mirror image's entries can be streamed side by side."""
    store = _store(tmp_path)
    entries = []
    for view in ("original", "flipped"):
        key = cache_writer.KEY.__class__(**{**cache_writer.KEY.fields(), "view": view})
        writer = store.writer(key, cache_writer.PART)
        for index in range(cache_writer.BATCHES):
            outputs, labels = cache_writer.batch(index)
            writer.add("train", [o + (view == "flipped") for o in outputs], labels)
        entries.append(writer.publish())
    assert entries[0].shard_records("train") == entries[1].shard_records("train")
    np.testing.assert_array_equal(entries[0].arrays("train")[1], entries[1].arrays("train")[1])


def test_arrays_read_into_memory_equal_the_streamed_records(tmp_path, monkeypatch):
    """Entry.arrays (numpy, chunk by chunk) and Entry.batches (tf.data) read the same layout."""
    monkeypatch.setattr(cache_store, "_READ_CHUNK", 1)  # A record per chunk: every boundary.
    entry = _publish(tmp_path / "cache")  # Default SHARD_BYTES: all records in one shard.
    assert len(entry.paths("train")) == 1
    streamed = [b for path in entry.paths("train") for b in entry.batches(path)]
    outputs, labels = entry.arrays("train")
    for k, output in enumerate(outputs):
        np.testing.assert_array_equal(
            output.numpy(), np.concatenate([b[0][k].numpy() for b in streamed]))
        assert output.dtype == streamed[0][0][k].dtype
    np.testing.assert_array_equal(labels, np.concatenate([b[1].numpy() for b in streamed]))


def _token_folders(root):
    folder = f"{root}/{cache_writer.KEY.name}/{cache_writer.PART}"
    return sorted(n.rstrip("/") for n in tf.io.gfile.listdir(folder))


def test_a_killed_writers_shards_are_removed_when_old_never_a_live_writers(
        root, one_record_per_shard):
    process = _writer(root, "hang_in_shards")
    assert process.stdout.readline().strip() == "WRITING"
    try:
        (live,) = _token_folders(root)
        # Alive and writing: neither a reader nor a writer of the part removes its shards.
        assert _store(root).lookup(cache_writer.KEY, cache_writer.PART) is None
        cache_store.Store(root, orphan_age_s=3600).writer(cache_writer.KEY,
                                                          cache_writer.PART).abort()
        assert live in _token_folders(root)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # Dead: kept while younger than the age, removed by the next reader once older.
    assert _store(root).remove_orphans(cache_writer.KEY, cache_writer.PART) == 0
    assert live in _token_folders(root)
    entry = _publish(root)
    aged = cache_store.Store(root, orphan_age_s=0)  # Everything unpublished counts as old.
    assert aged.lookup(cache_writer.KEY, cache_writer.PART) is not None
    assert _token_folders(root) == [entry.manifest["writer"]]  # The published shards stay.
    assert cache_writer.matches(aged.lookup(cache_writer.KEY, cache_writer.PART))


def test_an_old_temporary_manifest_is_removed_by_the_next_writer(tmp_path):
    root = tmp_path / "cache"
    process = _writer(root, "hang_before_link")
    assert process.stdout.readline().strip() == "LINKING"
    process.send_signal(signal.SIGKILL)
    process.wait()
    folder = root / cache_writer.KEY.name
    (temporary,) = [p for p in folder.iterdir() if ".tmp-" in p.name]
    (shards,) = (folder / cache_writer.PART).iterdir()
    day_ago = os.path.getmtime(temporary) - 2 * 24 * 3600
    for path in [temporary, shards, *shards.iterdir()]:
        os.utime(path, (day_ago, day_ago))
    writer = _store(root).writer(cache_writer.KEY, cache_writer.PART)  # The default age.
    assert not temporary.exists() and not shards.exists()
    writer.abort()


def test_a_killed_jobs_scratch_folder_is_removed_by_the_next_job_on_the_host(tmp_path):
    """A job without --cache_dir spills to a scratch folder of its own; kill -9 leaves it,
    and the next job's scratch_folder() removes it, never a live process's or another
    host's."""
    parent = str(tmp_path)
    killed = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer import cache_cleanup; "
         f"print(cache_cleanup.scratch_folder({parent!r}), flush=True); time.sleep(600)"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE, text=True)
    dead_folder = killed.stdout.readline().strip()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    with open(os.path.join(dead_folder, "shard-0"), "wb") as f:
        f.write(b"spilled")
    mine = cache_cleanup.scratch_folder(parent)  # This process is alive.
    other_host = tmp_path / f"{cache_cleanup.SCRATCH_PREFIX}elsewhere_{killed.pid}_x1"
    unrelated = tmp_path / "frozen_work_notes"
    other_host.mkdir()
    unrelated.mkdir()

    newest = cache_cleanup.scratch_folder(parent)

    assert not os.path.exists(dead_folder)
    assert sorted(os.listdir(parent)) == sorted(
        os.path.basename(p) for p in (mine, newest, other_host, unrelated))
    assert os.path.basename(newest).startswith(
        f"{cache_cleanup.SCRATCH_PREFIX}{cache_cleanup._host()}_{os.getpid()}_")
