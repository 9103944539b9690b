"""Training learns: the real trainer on a generated task, on every path that trains.

A short run on tests/learnable.py's colour task must reach accuracy far above
chance on the default (cached) path, the image path, Mirrored over two CPUs and
two MultiWorkerMirrored worker processes. The same run on mispaired labels
misses the bar, and every cached feature is checked against its own image and
label, so a bug that pairs features or images with the wrong labels fails here.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

import learnable
from conftest import tiny_config
from trainer import cluster
from trainer import features
from trainer import frozen_work
from trainer import model as model_lib
from trainer import train
from trainer.data import pipeline
from workers import Job


def _train(data_dir, job_dir, distribution=None, **overrides):
    """train_and_evaluate with learnable.SETTINGS (one device unless ``distribution``)."""
    config = tiny_config(data_dir, job_dir, **{**learnable.SETTINGS, **overrides})
    metrics = train.train_and_evaluate(
        config, distribution or cluster.create_strategy("one_device"))
    print(_summary(metrics))
    return metrics


def _summary(metrics):
    return {"test": metrics["test"]["accuracy"], "validation": metrics["validation"]["accuracy"],
            "val_accuracy": [round(v, 3) for v in metrics["history"]["val_accuracy"]],
            "accuracy": [round(v, 3) for v in metrics["history"]["accuracy"]]}


def test_default_cached_path_learns(learned_job):
    """Phase 1 on cached pooled features, phase 2 on the cached frontier (the defaults)."""
    config, metrics = learned_job
    assert config.feature_cache and config.fine_tune_cache
    assert learnable.failures(metrics) == [], _summary(metrics)


def test_image_path_learns(colour_dir, tmp_path):
    """Both phases run the backbone on (augmented) images, as the tutorial does."""
    metrics = _train(colour_dir, tmp_path / "job", feature_cache=False, fine_tune_cache=False)
    assert learnable.failures(metrics) == [], _summary(metrics)


def test_mirrored_over_two_cpus_learns(colour_dir, tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    # Batch 4 per replica: the same global batch of 8 as on one device.
    metrics = _train(colour_dir, tmp_path / "job", strategy, strategy="mirrored", batch_size=4)
    assert learnable.failures(metrics) == [], _summary(metrics)


def test_two_workers_learn(colour_dir, tmp_path):
    """Two `python -m trainer.task` processes with TF_CONFIG, global batch 8."""
    job_dir = tmp_path / "job"
    args = [f"--data_dir={colour_dir}", f"--job_dir={job_dir}",
            *(f"--{k}={v}" for k, v in {**learnable.SETTINGS, "batch_size": 4}.items())]
    with Job(args, 2, str(tmp_path / "workers.log")) as job:
        codes = job.wait(300)
        assert codes == [0, 0], job.chief.tail() + job.workers[1].tail()
    assert job.chief.matches(r"Strategy multi_worker with 2 replicas")
    with open(job_dir / "metrics.json") as f:
        metrics = json.load(f)
    print(_summary(metrics))
    assert learnable.failures(metrics) == [], _summary(metrics)


def _permute_cached_labels(monkeypatch):
    """Every batch the frozen pass caches gets its labels in a random order."""
    run_pass = frozen_work.run_pass
    rng = np.random.default_rng(0)

    class Mispairing:
        def __init__(self, sink):
            self.sink = sink

        def add(self, name, outputs, labels):
            self.sink.add(name, outputs, rng.permutation(labels))

    def mispaired(forward, splits, image_size, context, routes):
        routes = [(first, stop, [Mispairing(s) for s in sinks]) for first, stop, sinks in routes]
        return run_pass(forward, splits, image_size, context, routes)
    monkeypatch.setattr(frozen_work, "run_pass", mispaired)


def _permute_train_image_labels(monkeypatch):
    """The train split's images get one another's labels."""
    describe = pipeline.describe

    def mispaired(*args, **kwargs):
        info = describe(*args, **kwargs)
        split = info.splits["train"]
        labels = tuple(int(y) for y in np.random.default_rng(0).permutation(split.labels))
        info.splits["train"] = pipeline.Split(split.name, split.count, split.paths, labels)
        return info
    monkeypatch.setattr(pipeline, "describe", mispaired)


@pytest.mark.parametrize("mispair, feature_cache", [
    (_permute_cached_labels, True), (_permute_train_image_labels, False)],
    ids=["cached_features", "train_images"])
def test_mispaired_labels_miss_the_learning_bar(colour_dir, tmp_path, monkeypatch, mispair,
                                                feature_cache):
    """The control: the same checks fail when labels are shuffled (phase 1 only, for time)."""
    mispair(monkeypatch)
    metrics = _train(colour_dir, tmp_path / "job", feature_cache=feature_cache,
                     fine_tune_epochs=0)
    missed = learnable.failures(metrics, fine_tune_epochs=0)
    assert "test accuracy" in " ".join(missed), metrics


# ------------------------------------------------- Each cached feature's own image


def _direct_pooled(model, split, image_size):
    """Pooled features of each image of ``split`` (in path order) and of its mirror image,
    computed one image at a time, outside any pipeline."""
    pooled = features.pooled_model(model)
    images = np.stack([pipeline.preprocess_image(tf.io.read_file(p), image_size).numpy()
                       for p in split.paths])
    return (pooled(images, training=False).numpy(),
            pooled(images[:, :, ::-1], training=False).numpy())


def _assert_each_belongs(vectors, labels, direct, split, views=1):
    """Each vector is one image's own (or its mirror's) features, with that image's label;
    every image appears, each as often as the others."""
    candidates = np.concatenate(direct)  # [views * count, dim]
    owners = np.tile(np.arange(split.count), len(direct))
    vectors, labels = np.asarray(vectors), np.asarray(labels).reshape(-1)
    distances = np.linalg.norm(vectors[:, None, :] - candidates[None, :, :], axis=-1)
    nearest = distances.argmin(axis=1)
    scale = np.linalg.norm(candidates, axis=1).mean()
    assert distances[np.arange(len(vectors)), nearest].max() < 1e-3 * scale
    image = owners[nearest]
    np.testing.assert_array_equal(labels, np.asarray(split.labels)[image])
    return image


@pytest.mark.parametrize("fine_tune_cache", [False, True], ids=["pooled", "via_frontier"])
def test_each_cached_feature_belongs_to_its_own_image_and_label(colour_dir, fine_tune_cache):
    """FrozenWork's phase-1 (and phase-2) datasets, batch by batch, against each image."""
    info = pipeline.describe(colour_dir)
    splits = [info.splits["train"], info.splits["validation"]]
    model = model_lib.create_model("demo_cnn", 3, 32, 0.2, weights=None, augment=False, seed=0)
    strategy = tf.distribute.get_strategy()
    work = frozen_work.FrozenWork(model, splits, strategy, cluster.ClusterInfo(), 8, 0, 6,
                               fine_tune_cache, True, 1e9)
    assert work.fine_tune == fine_tune_cache
    direct = {s.name: _direct_pooled(model, s, 32) for s in splits}

    _, train_data, validation_data = work.phase_one()
    batches = iter(validation_data)
    seen = [_assert_each_belongs(*next(batches), direct["validation"][:1], splits[1])
            for _ in range(-(-splits[1].count // 8))]
    # One pass over validation, in order: each image once.
    assert sorted(np.concatenate(seen).tolist()) == list(range(splits[1].count))
    batches = iter(train_data)
    seen = [_assert_each_belongs(*next(batches), direct["train"][:1], splits[0])
            for _ in range(splits[0].count // 8)]
    # An epoch of shuffled train batches draws each image once.
    assert sorted(np.concatenate(seen).tolist()) == list(range(splits[0].count))

    if fine_tune_cache:
        cut = features.cut_at_frontier(model, 6)  # Its pooled: frontier -> pooled features.
        _, train_data, validation_data = work.phase_two()
        for data, split, views in ((train_data, splits[0], direct["train"]),
                                   (validation_data, splits[1], direct["validation"][:1])):
            batches = iter(data)
            for _ in range(split.count // 8):
                frontier, labels = next(batches)
                pooled = cut.pooled(list(tf.nest.flatten(frontier)), training=False).numpy()
                _assert_each_belongs(pooled, labels, views, split)
