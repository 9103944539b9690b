"""Four classes end to end: train, evaluate, export, predict, TFLite, with the right names."""

import json
import os

import numpy as np
import tensorflow as tf

from trainer import export
from trainer import figures
from trainer import predict
from trainer import tflite

FOUR_CLASSES = ["circle", "square", "star", "triangle"]  # Sorted folder names.


def test_job_leaves_every_result_with_the_four_class_names(finished_job):
    config, metrics = finished_job
    assert metrics["class_names"] == FOUR_CLASSES
    assert export.read_class_names(config.model_dir) == FOUR_CLASSES
    assert export.read_image_size(config.model_dir) == config.image_size
    with open(f"{config.job_dir}/tflite/{tflite.LABELS_FILE}") as f:
        assert f.read().splitlines() == FOUR_CLASSES
    assert os.path.getsize(f"{config.job_dir}/{figures.LEARNING_CURVES_FILE}") > 0

    with open(f"{config.job_dir}/metrics.json") as f:
        saved = json.load(f)
    test = saved["test"]
    assert test["count"] == 8  # Two per class.
    assert np.array(test["confusion_matrix"]).shape == (4, 4)
    assert np.array(test["confusion_matrix"]).sum() == 8
    assert list(test["per_class"]) == FOUR_CLASSES
    assert all(c["support"] == 2 for c in test["per_class"].values())
    assert "roc_auc" not in test  # Defined for two classes only.
    assert saved["history"]["phase"] == [1.0, 2.0]


def test_served_labels_are_class_names_and_agree_with_probabilities(finished_job):
    config, _ = finished_job
    with open(os.path.join(config.data_dir, "test", "triangle", "0001.jpg"), "rb") as f:
        outputs = tf.saved_model.load(export.resolve_model_dir(config.model_dir)).signatures["serving_default"](
            image_bytes=tf.constant([f.read()]))
    names = [n.decode() for n in outputs["class_names"].numpy()[0]]
    assert names == FOUR_CLASSES
    best = int(np.argmax(outputs["probabilities"].numpy()[0]))
    assert outputs["label"].numpy()[0].decode() == FOUR_CLASSES[best]


def test_predict_names_each_test_image_with_one_of_the_classes(finished_job):
    config, metrics = finished_job
    paths = predict.list_images([os.path.join(config.data_dir, "test")])
    results = list(predict.predict_files(config.model_dir, paths, top_k=4))
    assert len(results) == 8 and not any("error" in r for r in results)
    for result in results:
        assert sorted(c["label"] for c in result["top_k"]) == FOUR_CLASSES
        assert abs(sum(c["probability"] for c in result["top_k"]) - 1.0) < 1e-5
    # The prediction command and the evaluation agree image by image.
    predicted = np.zeros((4, 4), int)
    for result in results:
        true = FOUR_CLASSES.index(os.path.basename(os.path.dirname(result["path"])))
        predicted[true, FOUR_CLASSES.index(result["label"])] += 1
    assert predicted.tolist() == metrics["test"]["confusion_matrix"]
