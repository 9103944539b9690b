"""The frozen work held in memory, spilled to files or read from --cache_dir: the same.

Past its memory limit the cache is spilled and streamed instead of falling
back to images; these tests hold the two paths (and a cache read back by a
later job) to the same features, batch for batch, and the same trained
weights. demo_cnn at 32 px, weights=none.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from trainer import cache_store
from trainer import cluster
from trainer import export
from trainer import frozen_work
from trainer import model as model_lib
from trainer import train
from trainer.data import pipeline


def _batches(dataset, steps):
    batches = iter(dataset)
    return [tf.nest.map_structure(lambda t: t.numpy(), next(batches)) for _ in range(steps)]


def _phase_data(shapes_dir, max_bytes, cache_dir=""):
    info = pipeline.describe(shapes_dir)
    splits = [info.splits["train"], info.splits["validation"]]
    tf.keras.utils.set_random_seed(0)
    model = model_lib.create_model("demo_cnn", 3, 32, 0.2, weights=None, augment=False, seed=0)
    work = frozen_work.FrozenWork(model, splits, tf.distribute.get_strategy(),
                                  cluster.ClusterInfo(), 8, 0, 5, True, True, max_bytes,
                                  cache_dir=cache_dir)
    steps = 2 * (splits[0].count // 8)  # Two epochs: the reshuffle too.
    seen = []
    for phase in (work.phase_one, work.phase_two):
        _, train_data, validation_data = phase()
        seen.append((_batches(train_data, steps), _batches(validation_data, 3)))
    return work, seen


def _assert_same(first, second):
    tf.nest.map_structure(np.testing.assert_array_equal, first, second)


def test_spilled_and_cached_paths_give_the_in_memory_features_batch_for_batch(shapes_dir,
                                                                             tmp_path):
    memory, in_memory = _phase_data(shapes_dir, 1e9)
    spilled, from_files = _phase_data(shapes_dir, 0)
    assert memory.frontier_in_memory and not spilled.frontier_in_memory
    _assert_same(in_memory, from_files)
    # A cache_dir, filled by one job and read by the next (in memory, and streamed).
    _, filled = _phase_data(shapes_dir, 1e9, str(tmp_path / "cache"))
    _, read_back = _phase_data(shapes_dir, 1e9, str(tmp_path / "cache"))
    _, streamed = _phase_data(shapes_dir, 0, str(tmp_path / "cache"))
    for seen in (filled, read_back, streamed):
        _assert_same(in_memory, seen)


# README's Speed section states these: MobileNetV2 at 160 px, fine_tune_at 100.
SPACE_PER_IMAGE = {"float32": {"pooled": 5_120, "frontier": 268_800},
                   "mixed_float16": {"pooled": 2_560, "frontier": 134_400}}


@pytest.mark.parametrize("policy", sorted(SPACE_PER_IMAGE))
def test_space_per_image_is_what_the_readme_states(policy):
    splits = [pipeline.Split("train", 10), pipeline.Split("validation", 4)]
    try:
        tf.keras.mixed_precision.set_global_policy(policy)
        model = model_lib.create_model("mobilenet_v2", 2, 160, 0.2, weights=None, seed=0)
        work = frozen_work.FrozenWork(model, splits, tf.distribute.get_strategy(),
                                      cluster.ClusterInfo(), 8, 0, 100, True, True, 1e9)
        assert work.bytes_per_image == SPACE_PER_IMAGE[policy]
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_an_entry_on_disk_takes_its_bytes_per_image_and_little_more(shapes_dir, tmp_path):
    work, _ = _phase_data(shapes_dir, 1e9, str(tmp_path / "cache"))
    for kind in ("pooled", "frontier"):
        entry = cache_store.Store(str(tmp_path / "cache")).lookup(
            work.key(kind, "original"), cache_store.part_name(0, 1))
        assert entry.bytes_per_image() == work.bytes_per_image[kind]
        for split in ("train", "validation"):
            stored = sum(os.path.getsize(p) for p in entry.paths(split))
            records = sum(entry.shard_records(split))
            payload = entry.count(split) * entry.bytes_per_image()
            assert payload < stored <= payload + 100 * records + 4 * entry.count(split)


def _weights(config):
    """Every variable of the exported SavedModel, by checkpoint key."""
    reader = tf.train.load_checkpoint(
        f"{export.resolve_model_dir(config.model_dir)}/variables/variables")
    names = sorted(n for n in reader.get_variable_to_shape_map() if "OPTIMIZER" not in n)
    assert len(names) > 10
    return [(n, reader.get_tensor(n)) for n in names]


def test_spilled_job_trains_the_in_memory_jobs_weights_and_a_rerun_reads_its_cache(
        shapes_dir, tmp_path):
    strategy = cluster.create_strategy("one_device")
    common = dict(backbone="demo_cnn", fine_tune_at=5)
    memory = tiny_config(shapes_dir, tmp_path / "memory", **common)
    memory_metrics = train.train_and_evaluate(memory, strategy)
    cache_dir = str(tmp_path / "cache")
    spilled = tiny_config(shapes_dir, tmp_path / "spilled", fine_tune_cache_max_gb=0.0,
                          cache_dir=cache_dir, **common)
    spilled_metrics = train.train_and_evaluate(spilled, strategy)
    computed = {"pooled/original": "computed", "frontier/original": "computed",
                "frontier/flipped": "computed"}
    assert spilled_metrics["frozen_work"] == memory_metrics["frozen_work"] == computed
    speed = ("images_per_second",)
    assert ({k: v for k, v in spilled_metrics["history"].items() if k not in speed}
            == {k: v for k, v in memory_metrics["history"].items() if k not in speed})
    for (name, a), (_, b) in zip(_weights(memory), _weights(spilled)):
        np.testing.assert_array_equal(a, b, err_msg=name)

    # Other training flags, same frozen inputs: every entry is read, none computed.
    rerun = tiny_config(shapes_dir, tmp_path / "rerun", cache_dir=cache_dir,
                        learning_rate=3e-3, fine_tune_learning_rate=3e-4, dropout=0.5,
                        batch_size=2, epochs=2, optimizer="sgd", label_smoothing=0.1, **common)
    rerun_metrics = train.train_and_evaluate(rerun, strategy)
    assert rerun_metrics["frozen_work"] == {name: "read" for name in computed}
