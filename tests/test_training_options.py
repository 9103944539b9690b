"""Training options: learning-rate schedules, label smoothing, early stopping."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import learnable
from conftest import tiny_config
from trainer import callbacks as callbacks_lib
from trainer import cluster
from trainer import config as config_lib
from trainer import export
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


def test_early_stopping_restores_the_best_epochs_weights(colour_dir, tmp_path, monkeypatch):
    """A scripted loss curve: two epochs at the run's rate, then a 1000-fold rate
    for the rest, which must raise the validation loss above the best of the
    first two. Patience 2 therefore stops the phase before its 5 epochs end,
    whichever of the first two was best, and the exported model must hold
    that epoch's weights, not the last one's.
    """
    def scripted(name, base, total_steps, warmup_steps=0):
        steps_per_epoch = total_steps // 5
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [2 * steps_per_epoch], [base, 1000.0 * base])
    monkeypatch.setattr(schedules, "learning_rate", scripted)

    logits_by_epoch = []

    class Recording(callbacks_lib.EpochExtras):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            logits_by_epoch.append(
                [w.numpy() for w in self.model.get_layer(model_lib.LOGITS_LAYER).weights])
    monkeypatch.setattr(callbacks_lib, "EpochExtras", Recording)

    config = tiny_config(colour_dir, tmp_path / "job",
                         **{**learnable.SETTINGS, "epochs": 5, "fine_tune_epochs": 0,
                            "early_stopping_patience": 2})
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))

    val_loss = metrics["history"]["val_loss"]
    best = int(np.argmin(val_loss[:2]))
    assert len(val_loss) == best + 3, val_loss  # Stopped after 2 epochs without improvement.
    assert min(val_loss[2:]) > val_loss[best], val_loss
    # The exported model's logit kernel: its one variable of that shape ([128, 3]).
    exported = tf.train.load_checkpoint(f"{export.resolve_model_dir(config.model_dir)}/variables/variables")
    shape = list(logits_by_epoch[0][0].shape)
    [kernel] = [exported.get_tensor(k) for k, v in exported.get_variable_to_shape_map().items()
                if v == shape and "OPTIMIZER" not in k]
    np.testing.assert_array_equal(kernel, logits_by_epoch[best][0])
    assert not np.allclose(kernel, logits_by_epoch[-1][0])
    # Keras's val_loss and evaluate's loss of the exported model, same images.
    assert metrics["validation"]["loss"] == pytest.approx(val_loss[best], rel=1e-3)
