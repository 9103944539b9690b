"""BatchNorm folded into convolutions: the copy computes what the model computes."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from trainer import features
from trainer import folding
from trainer import model as model_lib


def _randomize_batch_norm(model: keras.Model, seed: int) -> None:
    """Moving statistics and affine weights far from the identity, so folding is not trivial."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.5, channels))


def _images(model: keras.Model) -> tf.Tensor:
    return tf.random.stateless_uniform([2, *model.input_shape[1:]], [3, 4], 0.0, 1.0)


# Foldable pairs at 32 px: every BatchNorm but ResNet50V2's pre-activation ones
# (they follow an addition or the input of a block) and none in the demo net.
@pytest.mark.parametrize("backbone, folded, total", [
    ("mobilenet_v2", 52, 52), ("mobilenet_v3_small", 34, 34), ("mobilenet_v3_large", 46, 46),
    ("efficientnet_v2_b0", 59, 59), ("resnet50_v2", 32, 49), ("demo_cnn", 0, 0)])
def test_folded_backbone_computes_the_same(backbone, folded, total):
    base = model_lib.BACKBONES[backbone].build((32, 32, 3), None)
    _randomize_batch_norm(base, seed=0)
    copy = folding.fold_batch_norm(base)

    assert [layer.name for layer in copy.layers] == [layer.name for layer in base.layers]
    remaining = [layer for layer in copy.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(remaining) == total - folded
    images = _images(base) * 255.0
    expected = base(images, training=False).numpy()
    np.testing.assert_allclose(copy(images, training=False).numpy(), expected,
                               rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("make_layer", [
    lambda: keras.layers.Conv2D(6, 3, use_bias=True, name="conv"),
    lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=3, use_bias=False, name="conv"),
])
@pytest.mark.parametrize("center, scale", [(True, True), (False, False)])
def test_convolution_kinds_and_batch_norm_options_fold_exactly(make_layer, center, scale):
    layer = make_layer()
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.BatchNormalization(center=center, scale=scale, epsilon=0.01,
                                        name="bn")(layer(inputs))
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    _randomize_batch_norm(model, seed=1)
    layer.weights[-1].assign(tf.random.stateless_normal(layer.weights[-1].shape, [5, 6]))

    assert folding.foldable_pairs(model) == {"bn": "conv"}
    copy = folding.fold_batch_norm(model)
    images = _images(model)
    np.testing.assert_allclose(copy(images).numpy(), model(images, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_batch_norm_is_kept_where_folding_would_change_the_result():
    inputs = keras.Input((8, 8, 2))
    shared = keras.layers.Conv2D(4, 1, name="read_twice")(inputs)
    kept = [keras.layers.BatchNormalization(name="bn_of_read_twice")(shared),
            keras.layers.ReLU(name="other_reader")(shared)]
    activated = keras.layers.Conv2D(4, 1, activation="relu", name="activated")(inputs)
    kept.append(keras.layers.BatchNormalization(name="bn_after_activation")(activated))
    first_axis = keras.layers.Conv2D(4, 1, name="conv_then_axis_1")(inputs)
    kept.append(keras.layers.BatchNormalization(axis=1, name="bn_axis_1")(first_axis))
    model = keras.Model(inputs, kept)

    assert folding.foldable_pairs(model) == {}
    copy = folding.fold_batch_norm(model)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in copy.layers) == 3


def test_copy_keeps_its_weights_when_the_model_trains_on():
    base = model_lib.BACKBONES["mobilenet_v2"].build((32, 32, 3), None)
    _randomize_batch_norm(base, seed=2)
    copy = folding.fold_batch_norm(base)
    images = _images(base)
    before = copy(images, training=False).numpy()
    for weight in base.trainable_weights:
        weight.assign(weight * 2.0)
    np.testing.assert_array_equal(copy(images, training=False).numpy(), before)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50_v2"])
def test_folded_prefix_feeds_the_models_own_rest(backbone):
    spec = model_lib.BACKBONES[backbone]
    model = model_lib.create_model(backbone, 3, 32, 0.2, weights=None, seed=0)
    base = model_lib.get_backbone(model)
    _randomize_batch_norm(base, seed=3)
    cut = features.cut_at_frontier(model, spec.fine_tune_at, folding.fold_batch_norm(base))

    assert not {id(w) for w in cut.prefix.weights} & {id(w) for w in model.weights}
    model_lib.set_trainable_for_phase(model, 2, spec.fine_tune_at)
    assert {id(w) for w in cut.rest.trainable_weights} == {id(w) for w in model.trainable_weights}
    images = _images(model) * 255.0
    expected = model(images, training=False).numpy()
    frontier = cut.prefix(images, training=False)
    np.testing.assert_allclose(cut.rest(frontier, training=False).numpy(), expected,
                               rtol=1e-4, atol=1e-4)
    pooled = keras.Model(model.input, model.get_layer(model_lib.POOL_LAYER).output)
    np.testing.assert_allclose(cut.pooled(frontier, training=False).numpy(),
                               pooled(images, training=False).numpy(), rtol=1e-4, atol=1e-4)
