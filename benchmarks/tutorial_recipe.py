"""The tutorial's way, reimplemented faithfully as the benchmark's baseline.

TensorFlow's "transfer learning and fine-tuning" tutorial, cell by cell:
``image_dataset_from_directory`` (shuffled, batch 32, 160 px), a fifth of the
validation batches taken as test, prefetch, flip + rotation augmentation,
MobileNetV2 called with ``training=False``, global average pooling, dropout
0.2, one logit; 10 epochs of Adam 1e-4, then layers from 100 on unfrozen for
10 epochs of RMSprop 1e-5. Only two things differ from the notebook: the
weights come from a local file (no download here), and accuracy reads the
logit with threshold 0 (the notebook's ``'accuracy'`` string compares logits
with 0.5, which under-reports it).
"""

import time
from typing import Callable, Dict, List

import tensorflow as tf
import tf_keras as keras

BATCH_SIZE = 32
IMG_SIZE = (160, 160)


def load_datasets(data_dir: str):
    """(train, validation, test) as the tutorial builds them."""
    train = keras.utils.image_dataset_from_directory(
        f"{data_dir}/train", shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE)
    validation = keras.utils.image_dataset_from_directory(
        f"{data_dir}/validation", shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE)
    val_batches = tf.data.experimental.cardinality(validation)
    test = validation.take(val_batches // 5)
    validation = validation.skip(val_batches // 5)
    autotune = tf.data.AUTOTUNE
    return (train.prefetch(autotune), validation.prefetch(autotune), test.prefetch(autotune))


def build_model(weights: str):
    """(model, base_model) as in the tutorial."""
    augmentation = keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.2),
    ])
    base_model = keras.applications.MobileNetV2(input_shape=IMG_SIZE + (3,), include_top=False,
                                                weights=None)
    base_model.load_weights(weights)
    base_model.trainable = False
    inputs = keras.Input(shape=IMG_SIZE + (3,))
    x = augmentation(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs), base_model


class _EpochClock(keras.callbacks.Callback):
    """Records (seconds since start, val_accuracy) at every epoch end."""

    def __init__(self, start: float, records: List[Dict]):
        super().__init__()
        self._start, self._records = start, records

    def on_epoch_end(self, epoch, logs=None):
        self._records.append({"epoch": epoch + 1, "seconds": time.perf_counter() - self._start,
                              "val_accuracy": float(logs["val_accuracy"])})


def run(data_dir: str, weights: str, epochs: int = 10, fine_tune_epochs: int = 10,
        on_model: Callable = None) -> Dict:
    """Trains the tutorial's two phases; returns timings and per-epoch accuracy."""
    start = time.perf_counter()
    train, validation, test = load_datasets(data_dir)
    model, base_model = build_model(weights)
    accuracy = keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=[accuracy])
    epochs_log: List[Dict] = []
    clock = _EpochClock(start, epochs_log)
    history = model.fit(train, epochs=epochs, validation_data=validation, callbacks=[clock],
                        verbose=2)
    phase1_end = time.perf_counter()

    base_model.trainable = True
    for layer in base_model.layers[:100]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.RMSprop(1e-5),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")])
    model.fit(train, epochs=epochs + fine_tune_epochs, initial_epoch=history.epoch[-1],
              validation_data=validation, callbacks=[clock], verbose=2)
    end = time.perf_counter()
    _, own_test_accuracy = model.evaluate(test, verbose=0)
    result = {
        "phase1_seconds": phase1_end - start,
        "phase2_seconds": end - phase1_end,
        "total_seconds": end - start,
        "epochs": epochs_log,
        "own_test_accuracy": float(own_test_accuracy),
    }
    if on_model:
        result.update(on_model(model))
    return result
