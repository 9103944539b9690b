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

``benchmarks/recipe.py`` runs it beside our trainer. On its own::

    python -m benchmarks.tutorial_recipe --data_dir=../shared/data/cats_and_dogs_filtered \
        --weights=../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

writes tutorial_recipe.{json,md} to ``--out_dir``. ``--smoke`` runs it at toy
size in seconds (generated shapes in a temporary folder, 32 px, batch 4,
random weights, one epoch per phase) to check that it still works; the test
suite runs it (tests/test_benchmarks.py). Its figures mean nothing.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import tensorflow as tf
import tf_keras as keras
from absl import app
from absl import flags

BATCH_SIZE = 32
IMG_SIZE = (160, 160)
SMOKE = dict(image_size=32, batch_size=4, epochs=1, fine_tune_epochs=1)


def load_datasets(data_dir: str, image_size: int = IMG_SIZE[0], batch_size: int = BATCH_SIZE):
    """(train, validation, test) as the tutorial builds them."""
    size = (image_size, image_size)
    train = keras.utils.image_dataset_from_directory(
        f"{data_dir}/train", shuffle=True, batch_size=batch_size, image_size=size)
    validation = keras.utils.image_dataset_from_directory(
        f"{data_dir}/validation", shuffle=True, batch_size=batch_size, image_size=size)
    val_batches = tf.data.experimental.cardinality(validation)
    test = validation.take(val_batches // 5)
    validation = validation.skip(val_batches // 5)
    autotune = tf.data.AUTOTUNE
    return (train.prefetch(autotune), validation.prefetch(autotune), test.prefetch(autotune))


def build_model(weights: Optional[str], image_size: int = IMG_SIZE[0]):
    """(model, base_model) as in the tutorial; ``weights=None`` leaves them random."""
    shape = (image_size, image_size, 3)
    augmentation = keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.2),
    ])
    base_model = keras.applications.MobileNetV2(input_shape=shape, include_top=False,
                                                weights=None)
    if weights:
        base_model.load_weights(weights)
    base_model.trainable = False
    inputs = keras.Input(shape=shape)
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


def run(data_dir: str, weights: Optional[str], epochs: int = 10, fine_tune_epochs: int = 10,
        on_model: Callable = None, image_size: int = IMG_SIZE[0],
        batch_size: int = BATCH_SIZE) -> Dict:
    """Trains the tutorial's two phases; returns timings and per-epoch accuracy."""
    start = time.perf_counter()
    train, validation, test = load_datasets(data_dir, image_size, batch_size)
    model, base_model = build_model(weights, image_size)
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


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """This module's own command line (recipe.py imports the module, not these flags)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "cats_and_dogs_filtered folder.", **fv)
    flags.DEFINE_string("weights", None, "MobileNetV2 no-top Keras h5 weights file.", **fv)
    flags.DEFINE_integer("epochs", 10, "Epochs of phase 1.", **fv)
    flags.DEFINE_integer("fine_tune_epochs", 10, "Epochs of phase 2.", **fv)
    flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                        "Where tutorial_recipe.json and .md are written.", **fv)
    flags.DEFINE_bool("smoke", False,
                      "Toy size in seconds (generated data, 32 px, batch 4, random weights, "
                      "1 epoch per phase): checks that it runs; its figures mean nothing.",
                      **fv)


def _main(argv):
    del argv
    from benchmarks import report
    from trainer.data import demo as demo_data

    FLAGS = flags.FLAGS
    command = "python -m benchmarks.tutorial_recipe " + " ".join(sys.argv[1:])
    if FLAGS.smoke:
        with tempfile.TemporaryDirectory(prefix="tutorial_smoke_") as folder:
            # Validation of 10 batches: the tutorial takes a fifth of them as test.
            data_dir = demo_data.write_dataset(folder, ("circle", "square"),
                                               {"train": 8, "validation": 20}, size=32)
            result = run(data_dir, None, **SMOKE)
    elif FLAGS.data_dir and FLAGS.weights:
        result = run(FLAGS.data_dir, FLAGS.weights, FLAGS.epochs, FLAGS.fine_tune_epochs)
    else:
        raise app.UsageError("--data_dir and --weights are required (or --smoke).")
    print(json.dumps(result, indent=2))
    lines = ["# The tutorial's recipe, on its own", "", "```", command, "```", "",
             f"{os.cpu_count()} cores, TensorFlow {tf.__version__}.", "",
             f"Phase 1 {result['phase1_seconds']:.1f} s, phase 2 {result['phase2_seconds']:.1f} s,"
             f" total {result['total_seconds']:.1f} s; test accuracy (its own held-out "
             f"batches) {result['own_test_accuracy']:.4f}.", ""]
    report.write(FLAGS.out_dir, "tutorial_recipe", command, result["epochs"], result, lines)


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
