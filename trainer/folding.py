"""BatchNorm folded into the convolution before it: the frozen backbone, faster.

In inference mode a BatchNormalization layer is a fixed affine map per
channel, ``y = (z - mean) * gamma / sqrt(var + eps) + beta``. When ``z`` is a
convolution's output read by nothing else, the map folds into that
convolution's kernel and bias, and the BatchNorm op disappears. This is what
TFLite and TensorRT do at conversion; on this project's 2-core CPU it made
MobileNetV2's forward pass 1.5x faster (benchmarks/frozen_forward.py).

``fold_batch_norm`` returns a copy for inference only: the copy's weights
are computed from the model's at the time of the call and are never trained.
The feature caches (trainer/features.py) run their single pass of the frozen
layers through it. Layer names and order are kept: each folded BatchNorm
becomes an identity layer of the same name, so layer indices such as
``--fine_tune_at`` mean the same layers in the copy.
"""

from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import tf_keras as keras

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
# Part of every cached frozen output's key (trainer/cache_key.py): bump when
# the folding changes what the folded copy computes.
VERSION = 1


def foldable_pairs(model: keras.Model) -> Dict[str, str]:
    """{BatchNorm layer name: name of the convolution folded into}, for ``model``'s own graph.

    A pair qualifies when the convolution has no activation and only the
    BatchNorm reads it, and the BatchNorm normalizes the last axis (channels
    last) in the plain way (no renorm, no virtual batches).
    """
    layers = model.get_config()["layers"]
    readers = Counter(name for layer in layers for name in _inbound_names(layer))
    by_name = {layer.name: layer for layer in model.layers}
    pairs = {}
    for config in layers:
        layer, inbound = by_name[config["name"]], _inbound_names(config)
        if len(inbound) != 1 or not _plain_batch_norm(layer):
            continue
        conv = by_name[inbound[0]]
        if (isinstance(conv, _CONVOLUTIONS) and conv.get_config()["activation"] == "linear"
                and readers[conv.name] == 1):
            pairs[layer.name] = conv.name
    return pairs


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of the functional ``model`` with each foldable BatchNorm folded away.

    The copy computes what ``model`` computes called with ``training=False``,
    up to float rounding. Layers without a foldable BatchNorm are cloned with
    their weights copied.
    """
    pairs = foldable_pairs(model)
    folded_convs = set(pairs.values())

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in pairs:
            return keras.layers.Activation("linear", name=layer.name, dtype=config["dtype"])
        if layer.name in folded_convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    batch_norm_of = {conv: bn for bn, conv in pairs.items()}
    for layer in model.layers:
        if layer.name in pairs or not layer.weights:
            continue
        if layer.name in batch_norm_of:
            weights = _folded(layer, model.get_layer(batch_norm_of[layer.name]))
        else:
            weights = layer.get_weights()
        copy.get_layer(layer.name).set_weights(weights)
    return copy


def _folded(conv: keras.layers.Layer, batch_norm: keras.layers.Layer) -> List[np.ndarray]:
    """[kernel, bias] of ``conv`` followed by ``batch_norm`` in inference mode."""
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    kernel = (conv.depthwise_kernel if depthwise else conv.kernel).numpy().astype(np.float64)
    channels = batch_norm.moving_mean.shape[0]
    bias = conv.bias.numpy().astype(np.float64) if conv.use_bias else np.zeros(channels)
    gamma, beta = _affine(batch_norm, channels)
    scale = gamma / np.sqrt(batch_norm.moving_variance.numpy().astype(np.float64)
                            + batch_norm.epsilon)
    if depthwise:
        # Output channel of a depthwise kernel (h, w, in, multiplier) is
        # in * multiplier + m: the order of its last two axes flattened.
        scale_of_kernel = scale.reshape(kernel.shape[2:])
    else:  # Conv2D: (h, w, in, out).
        scale_of_kernel = scale
    kernel = kernel * scale_of_kernel
    bias = (bias - batch_norm.moving_mean.numpy()) * scale + beta
    dtype = conv.weights[0].dtype.as_numpy_dtype
    return [kernel.astype(dtype), bias.astype(dtype)]


def _affine(batch_norm: keras.layers.Layer, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    gamma = batch_norm.gamma.numpy() if batch_norm.scale else np.ones(channels)
    beta = batch_norm.beta.numpy() if batch_norm.center else np.zeros(channels)
    return gamma.astype(np.float64), beta.astype(np.float64)


def _plain_batch_norm(layer: keras.layers.Layer) -> bool:
    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    config = layer.get_config()
    axis = config["axis"]
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    rank = len(layer.input_shape)
    return (list(axis) in ([-1], [rank - 1]) and not config.get("renorm")
            and not config.get("virtual_batch_size"))


def _inbound_names(layer_config: dict) -> List[str]:
    """Names of the layers whose outputs a layer of a functional config reads."""
    names = []

    def visit(value):
        # A node is [layer name, node index, tensor index, kwargs]; kwargs
        # may hold more such references (e.g. a TFOpLambda's second operand).
        if (isinstance(value, list) and len(value) >= 3 and isinstance(value[0], str)
                and isinstance(value[1], int) and isinstance(value[2], int)):
            names.append(value[0])
            for rest in value[3:]:
                visit(rest)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(layer_config["inbound_nodes"])
    return names
