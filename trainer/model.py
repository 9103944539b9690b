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
POOL_LAYER = "pool"
DROPOUT_LAYER = "dropout"
RESCALE_LAYER = "rescale"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registry entry.

    Attributes:
      build: (input_shape, weights) -> Keras model without a top; weights is
        'imagenet' or None.
      rescale: (scale, offset) mapping [0, 255] to the backbone's input range,
        or None when the backbone preprocesses inside itself.
      fine_tune_at: default first layer unfrozen in phase 2.
      native_size: the input side its ImageNet weights were trained at, or
        None (no pre-trained weights).
      imagenet_file: where Keras downloads its ImageNet weights from, relative
        to IMAGENET_URL, ``{size}`` standing for one of ``imagenet_sizes``;
        Keras keeps the file as ``~/.keras/models/<its name>``
        (trainer/preflight.py checks it is there or can be downloaded).
      imagenet_sizes: input sides with weights of their own; any other side
        loads the ``native_size`` file.
    """

    build: Callable[[Tuple[int, int, int], Optional[str]], keras.Model]
    rescale: Optional[Tuple[float, float]]
    fine_tune_at: int
    native_size: Optional[int] = 224
    imagenet_file: str = ""
    imagenet_sizes: Tuple[int, ...] = ()

    def imagenet_file_for(self, image_size: int) -> str:
        """The ``imagenet_file`` that Keras downloads for this input side."""
        size = image_size if image_size in self.imagenet_sizes else self.native_size
        return self.imagenet_file.format(size=size)


def _build_demo_cnn(input_shape, weights):
    """A small conv net for the offline demo; it has no ImageNet weights."""
    if weights == "imagenet":
        raise ValueError("demo_cnn has no ImageNet weights; use --weights=none or a file.")
    inputs = keras.Input(input_shape)
    # Per-image standardisation: the shapes' colours are random, their
    # contrast with the background is what matters.
    x = keras.layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False,
                                        name="standardize")(inputs)
    for i, filters in enumerate((32, 64, 128, 128)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"block{i + 1}_conv")(x)
        # GroupNorm, not BatchNorm: it normalises the same way in training
        # and inference, so the backbone trains from scratch although the
        # classifier always calls it in inference mode.
        x = keras.layers.GroupNormalization(8, name=f"block{i + 1}_norm")(x)
        x = keras.layers.ReLU(name=f"block{i + 1}_relu")(x)
        if i < 3:
            x = keras.layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    return keras.Model(inputs, x, name="demo_cnn")


def _application(constructor, **kwargs):
    def build(input_shape, weights):
        return constructor(input_shape=input_shape, include_top=False, weights=weights, **kwargs)
    return build


_TO_MINUS_ONE_ONE = (1.0 / 127.5, -1.0)
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# One entry per backbone; adding a backbone is adding an entry.
# fine_tune_at follows the recipe's MobileNetV2 value (layer 100 of 154):
# about the last third of the backbone trains in phase 2, starting at the
# first layer of a block (layer counts as tf_keras 2.21 builds them).
BACKBONES = {
    "mobilenet_v2": Backbone(
        _application(keras.applications.MobileNetV2, alpha=1.0), _TO_MINUS_ONE_ONE, 100,
        imagenet_file="mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_"
                      "{size}_no_top.h5", imagenet_sizes=(96, 128, 160, 192, 224)),
    "mobilenet_v3_small": Backbone(  # 229 layers; 154 starts expanded_conv_8.
        _application(keras.applications.MobileNetV3Small, include_preprocessing=True),
        None, 154,
        imagenet_file="mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    "mobilenet_v3_large": Backbone(  # 263 layers; 165 starts expanded_conv_11.
        _application(keras.applications.MobileNetV3Large, include_preprocessing=True),
        None, 165,
        imagenet_file="mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    "efficientnet_v2_b0": Backbone(  # 270 layers; 177 starts block6c.
        _application(keras.applications.EfficientNetV2B0, include_preprocessing=True),
        None, 177, imagenet_file="efficientnet_v2/efficientnetv2-b0_notop.h5"),
    "resnet50_v2": Backbone(  # 190 layers; 120 starts conv4_block4.
        _application(keras.applications.ResNet50V2), _TO_MINUS_ONE_ONE, 120,
        imagenet_file="resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "demo_cnn": Backbone(_build_demo_cnn, _TO_MINUS_ONE_ONE, 6, native_size=None),  # Blocks 2-4.
}


def create_model(backbone: str, num_classes: int, image_size: int, dropout: float,
                 weights: Optional[str] = None, augment: bool = True,
                 seed: Optional[int] = None, multi_label: bool = False) -> keras.Model:
    """Builds the classifier.

    Args:
      backbone: a key of BACKBONES.
      num_classes: 2 gives one logit (binary); more give one logit per class.
      multi_label: one logit per class whatever their number (read through sigmoids).
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
        x = augmentation(seed)(x)
    if spec.rescale:
        x = keras.layers.Rescaling(*spec.rescale, name=RESCALE_LAYER)(x)
    x = base(x, training=False)  # BatchNorm stays in inference mode in both phases.
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    x = keras.layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    units = 1 if num_classes == 2 and not multi_label else num_classes
    outputs = keras.layers.Dense(units, dtype="float32", name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def augmentation(seed: Optional[int] = None) -> keras.Sequential:
    """The recipe's augmentation: horizontal flip and rotation by up to 0.2 of a turn.

    Active only when called with training=True. It sits inside the model by
    default; under XLA it runs in the input pipeline instead, because the
    rotation's image-transform op has no XLA kernel.
    """
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed, name="random_flip"),
        keras.layers.RandomRotation(0.2, seed=seed, name="random_rotation"),
    ], name="augmentation")


def get_backbone(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_LAYER)


def set_trainable_for_phase(model: keras.Model, phase: int, fine_tune_at: int) -> None:
    """Phase 1 freezes the whole backbone; phase 2 unfreezes layers from fine_tune_at on."""
    base = get_backbone(model)
    base.trainable = phase == 2
    if phase == 2:
        for layer in base.layers[:fine_tune_at]:
            layer.trainable = False


def loss_and_metrics(num_classes: int, label_smoothing: float = 0.0):
    """Cross-entropy from logits and accuracy that reads logits correctly.

    With one logit the decision threshold is 0 (probability 0.5), not the
    0.5 that Keras's plain 'accuracy' would apply to a logit.

    Label smoothing ``s`` trains towards softened targets: ``y(1 - s) + s/2``
    for the one binary logit, ``one_hot(y)(1 - s) + s/K`` for K classes.
    """
    if num_classes == 2:
        return (keras.losses.BinaryCrossentropy(from_logits=True,
                                                label_smoothing=label_smoothing),
                [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    loss = (SmoothedSparseCategoricalCrossentropy(label_smoothing) if label_smoothing
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return loss, [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


class SmoothedSparseCategoricalCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy from logits and integer labels, with label smoothing.

    Keras 2's SparseCategoricalCrossentropy has no label smoothing, and the
    pipeline yields integer labels, so this one-hot encodes them first.
    """

    def __init__(self, label_smoothing: float, name: str = "sparse_categorical_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        import tensorflow as tf

        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def probabilities(logits, num_classes: int, multi_label: bool = False):
    """Class probabilities [batch, num_classes] from the model's logits (multi-label:
    each class's own sigmoid)."""
    import tensorflow as tf

    if multi_label:
        return tf.sigmoid(logits)
    if num_classes == 2:
        p = tf.sigmoid(logits)
        return tf.concat([1.0 - p, p], axis=-1)
    return tf.nn.softmax(logits, axis=-1)
