"""Training options: learning-rate schedules, label smoothing, early stopping."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import cluster
from trainer import config as config_lib
from trainer import model as model_lib
from trainer import schedules
from trainer import train


def _rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def test_constant_without_warmup_is_the_recipes_plain_rate():
    assert schedules.learning_rate("constant", 1e-4, total_steps=100) == 1e-4


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    schedule = schedules.learning_rate("cosine", 1.0, total_steps=110, warmup_steps=10)
    np.testing.assert_allclose(_rates(schedule, [0, 4, 9]), [0.1, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_rates(schedule, [10, 60, 110]), [1.0, 0.5, 0.0], atol=1e-6)
    assert np.all(np.diff(_rates(schedule, range(10, 111))) <= 1e-7)


def test_warmup_then_constant_and_warmup_longer_than_the_phase():
    schedule = schedules.learning_rate("constant", 2.0, total_steps=100, warmup_steps=4)
    np.testing.assert_allclose(_rates(schedule, [0, 3, 50, 99]), [0.5, 2.0, 2.0, 2.0])
    clipped = schedules.learning_rate("constant", 1.0, total_steps=5, warmup_steps=50)
    assert float(clipped(4)) == pytest.approx(1.0)  # Warmup ends with the phase.


def test_binary_label_smoothing_softens_the_target():
    loss, _ = model_lib.loss_and_metrics(2, label_smoothing=0.2)
    logits, labels = np.array([[2.0], [-1.0]], np.float32), np.array([1, 0])
    targets = labels * 0.8 + 0.1
    p = 1 / (1 + np.exp(-logits[:, 0]))
    expected = np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
    # As fit() passes them: int labels [batch], one logit [batch, 1].
    actual = loss(tf.constant(labels, tf.int32), tf.constant(logits))
    assert float(actual) == pytest.approx(expected, rel=1e-5)


def test_multiclass_label_smoothing_softens_the_target():
    loss, _ = model_lib.loss_and_metrics(4, label_smoothing=0.2)
    logits = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0]], np.float32)
    labels = np.array([0, 3])
    targets = np.eye(4)[labels] * 0.8 + 0.2 / 4
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = np.mean(-(targets * log_p).sum(axis=1))
    actual = loss(tf.constant(labels, tf.int32), tf.constant(logits))
    assert float(actual) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("field, value", [
    ("lr_schedule", "linear"), ("warmup_epochs", -1.0), ("label_smoothing", 1.0),
    ("early_stopping_patience", -1)])
def test_invalid_option_values_name_their_flag(make_config, binary_dir, field, value):
    with pytest.raises(config_lib.ConfigError, match=f"--{field}="):
        make_config(binary_dir, **{field: value})


def test_early_stopping_keeps_the_best_validation_loss(make_config, binary_dir):
    # A high learning rate makes the validation loss jump about, so the last
    # epoch is unlikely to be the best; the exported model must be the best.
    config = make_config(binary_dir, backbone="demo_cnn", fine_tune_at=5, epochs=4,
                         fine_tune_epochs=0, learning_rate=0.05, augment=False,
                         early_stopping_patience=1)
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    val_loss = metrics["history"]["val_loss"]
    assert 1 <= len(val_loss) <= 4
    # Keras's val_loss and evaluate's loss of the exported model, same images.
    assert metrics["validation"]["loss"] == pytest.approx(min(val_loss), rel=1e-3)
