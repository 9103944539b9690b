"""Speed options at tiny size: the frozen backbone's caches, mixed precision, XLA."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from conftest import tiny_config
from trainer import cluster
from trainer import export
from trainer import features
from trainer import frozen_data
from trainer import frozen_work
from trainer import model as model_lib
from trainer import train
from trainer.data import pipeline


def test_cached_features_equal_the_backbone_forward_pass(shapes_dir):
    model = model_lib.create_model("mobilenet_v2", 3, 32, 0.2, weights=None, seed=0)
    split = pipeline.describe(shapes_dir).splits["train"]
    context = tf.distribute.InputContext(1, 0, 1)
    pooled = features.pooled_model(model)
    [((vectors,), labels)] = features.extract(lambda x: pooled(x, training=False), [split], 32,
                                              context)
    assert vectors.shape == (split.count, 1280)

    # Row by row: the same image's features, with that image's label
    # (tests/test_learning.py matches every cached feature to its own file).
    pooled = keras.Model(model.input, model.get_layer(model_lib.POOL_LAYER).output)
    images = pipeline.make_dataset(split, 32, 64, training=False, cache="none")
    direct, direct_labels = zip(*[(pooled(x, training=False).numpy(), y.numpy())
                                  for x, y in images])
    np.testing.assert_allclose(vectors, np.concatenate(direct), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, np.concatenate(direct_labels))


@pytest.mark.parametrize("backbone", sorted(model_lib.BACKBONES))
def test_prefix_and_rest_of_the_cut_compose_to_the_full_model_and_share_its_layers(backbone):
    spec = model_lib.BACKBONES[backbone]
    model = model_lib.create_model(backbone, 3, 32, 0.2, weights=None, seed=0)
    prefix, rest, _ = features.cut_at_frontier(model, spec.fine_tune_at)
    images = tf.random.stateless_uniform([2, 32, 32, 3], [1, 2], 0, 255)
    np.testing.assert_allclose(rest(prefix(images), training=False).numpy(),
                               model(images, training=False).numpy(), rtol=1e-5, atol=1e-5)
    model_lib.set_trainable_for_phase(model, 2, spec.fine_tune_at)
    assert ({id(w) for w in rest.trainable_weights} == {id(w) for w in model.trainable_weights})
    assert features.frontier_bytes(prefix, 2) == sum(
        t.numpy().nbytes for t in tf.nest.flatten(prefix(images)))


def test_frontier_bytes_count_what_is_cached_under_mixed_precision():
    images = tf.random.stateless_uniform([2, 32, 32, 3], [1, 2], 0, 255)
    counted = {}
    try:
        for policy in ("float32", "mixed_float16"):
            keras.mixed_precision.set_global_policy(policy)
            model = model_lib.create_model("mobilenet_v2", 3, 32, 0.2, weights=None, seed=0)
            prefix = features.cut_at_frontier(model, 100).prefix
            counted[policy] = features.frontier_bytes(prefix, 2)
            assert counted[policy] == sum(t.numpy().nbytes
                                          for t in tf.nest.flatten(prefix(images)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert counted["mixed_float16"] * 2 == counted["float32"]


def test_fine_tune_cache_over_its_memory_limit_spills_instead_of_falling_back(shapes_dir):
    model = model_lib.create_model("mobilenet_v2", 3, 32, 0.2, weights=None, seed=0)
    splits = [pipeline.describe(shapes_dir).splits[name] for name in ("train", "validation")]

    def frozen_work_(max_bytes):
        return frozen_work.FrozenWork(model, splits, tf.distribute.get_strategy(),
                                      cluster.ClusterInfo(), 4, 0, 100, True, flip, max_bytes)

    prefix = features.cut_at_frontier(model, 100).prefix
    for flip, count in [(False, splits[0].count + splits[1].count),
                        (True, 2 * splits[0].count + splits[1].count)]:
        needed = features.frontier_bytes(prefix, count)
        assert frozen_work_(needed).frontier_in_memory
        spilled = frozen_work_(needed - 1)
        assert spilled.fine_tune and not spilled.frontier_in_memory  # No cliff.


def test_cached_frontier_gives_the_pooled_features_of_images(shapes_dir):
    model = model_lib.create_model("mobilenet_v2", 3, 32, 0.2, weights=None, seed=0)
    split = pipeline.describe(shapes_dir).splits["validation"]
    context = tf.distribute.InputContext(1, 0, 1)
    cut = features.cut_at_frontier(model, 100)
    [(frontier, labels)] = features.extract(lambda x: cut.prefix(x, training=False), [split], 32,
                                            context)
    assert len(frontier) == 2 and len(frontier[0]) == len(labels) == split.count
    pooled_via_frontier = cut.pooled(list(frontier), training=False).numpy()
    pooled = features.pooled_model(model)
    [((direct,), direct_labels)] = features.extract(lambda x: pooled(x, training=False), [split],
                                                    32, context)
    np.testing.assert_array_equal(labels, direct_labels)
    np.testing.assert_allclose(pooled_via_frontier, direct, rtol=1e-4, atol=1e-5)


def test_flipped_view_is_taken_half_the_time(shapes_dir):
    arrays = (np.zeros([64, 2], np.float32),)
    flipped = (np.ones([64, 2], np.float32),)
    labels = np.zeros([64], np.int32)
    strategy = tf.distribute.get_strategy()
    dataset = frozen_data.distribute(strategy, (arrays, labels), 64, True, 0,
                                  tf.distribute.InputContext(1, 0, 1), flipped)
    batches = iter(dataset)
    taken = np.concatenate([next(batches)[0].numpy()[:, 0] for _ in range(20)])
    assert set(taken) == {0.0, 1.0}
    assert 0.4 < taken.mean() < 0.6


def test_head_trains_the_full_models_logit_layer():
    model = model_lib.create_model("demo_cnn", 3, 32, 0.2, weights=None, seed=0)
    head = features.head_model(model)
    assert head.get_layer(model_lib.LOGITS_LAYER) is model.get_layer(model_lib.LOGITS_LAYER)
    kernel = model.get_layer(model_lib.LOGITS_LAYER).kernel
    head.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(True))
    before = kernel.numpy().copy()
    head.fit(np.ones((4, 128), np.float32), np.array([0, 1, 2, 0]), verbose=0)
    assert not np.array_equal(before, kernel.numpy())


@pytest.mark.parametrize("task_type, task_id, has_chief, expected", [
    ("chief", 0, True, 0), ("worker", 0, True, 1), ("worker", 1, True, 2),
    ("worker", 0, False, 0), ("worker", 1, False, 1)])
def test_feature_cache_reads_the_same_share_as_the_worker_pipeline(
        task_type, task_id, has_chief, expected):
    info = cluster.ClusterInfo(task_type, task_id, 3, has_chief_task=has_chief)
    context = features.input_context(info, tf.distribute.get_strategy())
    assert context.input_pipeline_id == expected
    assert context.num_input_pipelines == 3


def test_mixed_precision_keeps_logits_float32(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path, backbone="demo_cnn", fine_tune_at=0,
                         mixed_precision="mixed_bfloat16")
    try:
        metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
        model = model_lib.create_model("demo_cnn", 3, 32, 0.2, weights=None)
        assert model.get_layer(model_lib.BACKBONE_LAYER).compute_dtype == "bfloat16"
        assert model.output.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(metrics["history"]["loss"]).all()
    served = tf.saved_model.load(export.resolve_model_dir(config.model_dir)).signatures["serving_images"]
    out = served(images=tf.zeros([1, 32, 32, 3]))["probabilities"]
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy().sum(), 1.0, rtol=1e-3)


def test_jit_compile_trains(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path, backbone="demo_cnn", fine_tune_at=0,
                         jit_compile=True, feature_cache=False)
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
    assert np.isfinite(metrics["history"]["loss"]).all()
