"""The classifier: backbone registry, head, and which layers train in a phase.

The model takes raw pixels (float32 in [0, 255]); augmentation and the
backbone's own preprocessing are layers inside it, so the exported model needs
nothing but decoded images. The backbone is always called with
``training=False``: its BatchNorm layers stay in inference mode in both phases,
so their moving statistics never change (the recipe's rule for fine-tuning).

This module knows nothing of files, flags or strategies: callers build the
model inside their strategy's scope and pass plain values.
"""

import dataclasses
from typing import Callable, Optional, Tuple

import tf_keras as keras

BACKBONE_LAYER = "backbone"
LOGITS_LAYER = "logits"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registry entry.

    Attributes:
      build: (input_shape, weights) -> Keras model without a top; weights is
        'imagenet' or None.
      rescale: (scale, offset) mapping [0, 255] to the backbone's input range,
        or None when the backbone preprocesses inside itself.
      fine_tune_at: default first layer unfrozen in phase 2.
    """

    build: Callable[[Tuple[int, int, int], Optional[str]], keras.Model]
    rescale: Optional[Tuple[float, float]]
    fine_tune_at: int


def _build_demo_cnn(input_shape, weights):
    """A small conv net for the offline demo; it has no ImageNet weights."""
    if weights == "imagenet":
        raise ValueError("demo_cnn has no ImageNet weights; use --weights=none or a file.")
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"block{i + 1}_conv")(x)
        x = keras.layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="block4_conv")(x)
    return keras.Model(inputs, x, name="demo_cnn")


def _application(constructor, **kwargs):
    def build(input_shape, weights):
        return constructor(input_shape=input_shape, include_top=False, weights=weights, **kwargs)
    return build


_TO_MINUS_ONE_ONE = (1.0 / 127.5, -1.0)

# One entry per backbone; adding a backbone is adding an entry.
BACKBONES = {
    "mobilenet_v2": Backbone(
        _application(keras.applications.MobileNetV2, alpha=1.0), _TO_MINUS_ONE_ONE, 100),
    "mobilenet_v3_small": Backbone(
        _application(keras.applications.MobileNetV3Small, include_preprocessing=True),
        None, 150),
    "mobilenet_v3_large": Backbone(
        _application(keras.applications.MobileNetV3Large, include_preprocessing=True),
        None, 200),
    "efficientnet_v2_b0": Backbone(
        _application(keras.applications.EfficientNetV2B0, include_preprocessing=True),
        None, 200),
    "resnet50_v2": Backbone(
        _application(keras.applications.ResNet50V2), _TO_MINUS_ONE_ONE, 150),
    "demo_cnn": Backbone(_build_demo_cnn, _TO_MINUS_ONE_ONE, 5),
}


def create_model(backbone: str, num_classes: int, image_size: int, dropout: float,
                 weights: Optional[str] = None, augment: bool = True,
                 seed: Optional[int] = None) -> keras.Model:
    """Builds the classifier.

    Args:
      backbone: a key of BACKBONES.
      num_classes: 2 gives one logit (binary); more give one logit per class.
      image_size: side of the square input, pixels.
      dropout: rate before the logit layer.
      weights: 'imagenet', None (random), or a local Keras weights file
        loaded into the backbone.
      augment: random flip and rotation, active in training only.
      seed: seed of the augmentation layers.

    Returns:
      A Keras model from float32 pixels [0, 255] to logits.
    """
    spec = BACKBONES[backbone]
    shape = (image_size, image_size, 3)
    base = spec.build(shape, "imagenet" if weights == "imagenet" else None)
    if weights not in (None, "imagenet"):
        base.load_weights(weights)
    base = keras.Model(base.inputs, base.outputs, name=BACKBONE_LAYER)

    inputs = keras.Input(shape, name="image")
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="random_flip")(x)
        x = keras.layers.RandomRotation(0.2, seed=seed, name="random_rotation")(x)
    if spec.rescale:
        x = keras.layers.Rescaling(*spec.rescale, name="rescale")(x)
    x = base(x, training=False)  # BatchNorm stays in inference mode in both phases.
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    units = 1 if num_classes == 2 else num_classes
    outputs = keras.layers.Dense(units, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def get_backbone(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_LAYER)


def set_trainable_for_phase(model: keras.Model, phase: int, fine_tune_at: int) -> None:
    """Phase 1 freezes the whole backbone; phase 2 unfreezes layers from fine_tune_at on."""
    base = get_backbone(model)
    base.trainable = phase == 2
    if phase == 2:
        for layer in base.layers[:fine_tune_at]:
            layer.trainable = False


def loss_and_metrics(num_classes: int):
    """Cross-entropy from logits and accuracy that reads logits correctly.

    With one logit the decision threshold is 0 (probability 0.5), not the
    0.5 that Keras's plain 'accuracy' would apply to a logit.
    """
    if num_classes == 2:
        return (keras.losses.BinaryCrossentropy(from_logits=True),
                [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            [keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def probabilities(logits, num_classes: int):
    """Class probabilities [batch, num_classes] from the model's logits."""
    import tensorflow as tf

    if num_classes == 2:
        p = tf.sigmoid(logits)
        return tf.concat([1.0 - p, p], axis=-1)
    return tf.nn.softmax(logits, axis=-1)
