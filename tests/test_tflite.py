"""TFLite export: the interpreter's outputs match the SavedModel's on the same images."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import export
from trainer import model as model_lib
from trainer import tflite
from trainer.data import pipeline

from test_artifacts import TOLERANCE  # Bars per artifact, and how they were set.


def _test_images(data_dir, image_size):
    info = pipeline.describe(data_dir)
    dataset = pipeline.make_dataset(info.splits["test"], image_size, 64, training=False,
                                    cache="none")
    return np.concatenate([images.numpy() for images, _ in dataset]).astype(np.float32)


def _saved_model_probabilities(model_dir, images):
    serve = tf.saved_model.load(export.resolve_model_dir(model_dir)).signatures["serving_images"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


@pytest.mark.parametrize("variant", tflite.VARIANTS)
def test_tflite_of_a_learned_job_matches_its_saved_model(learned_job, variant):
    config, metrics = learned_job
    images = _test_images(config.data_dir, config.image_size)
    expected = _saved_model_probabilities(config.model_dir, images)
    path = tflite.tflite_path(f"{config.job_dir}/tflite", variant)
    actual = tflite.classify(path, images)
    assert actual.shape == expected.shape == (len(images), 3)
    print(variant, "max abs difference", np.abs(actual - expected).max())
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE[f"tflite_{variant}"])
    # The same class for every image, so the same accuracy as the SavedModel's.
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))
    assert expected.max(axis=1).mean() > 0.9  # A confident model: a real comparison.
    with open(f"{config.job_dir}/tflite/{tflite.LABELS_FILE}") as f:
        assert f.read().splitlines() == metrics["class_names"]


def test_binary_model_one_logit_converts_too(binary_dir, tmp_path):
    keras_model = model_lib.create_model("demo_cnn", 2, 32, 0.2, augment=False, seed=0)
    model_dir = export.export_model(keras_model, ["circle", "square"], 32,
                                    str(tmp_path / "model"))
    images = _test_images(binary_dir, 32)
    np.testing.assert_allclose(tflite.classify(tflite.convert(model_dir, tflite.FLOAT), images),
                               _saved_model_probabilities(model_dir, images),
                               atol=TOLERANCE["tflite_float"])
