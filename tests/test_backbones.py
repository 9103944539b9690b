"""The backbone registry: every entry builds, fine-tunes a step, and has a sensible default."""

import numpy as np
import pytest
import tf_keras as keras
from absl import flags

from trainer import config as config_lib
from trainer import model as model_lib

# The smallest input every registered Keras application accepts.
SMALLEST_SIZE = 32


@pytest.mark.parametrize("name", sorted(model_lib.BACKBONES))
def test_backbone_builds_and_fine_tunes_one_step(name):
    keras.backend.clear_session()
    spec = model_lib.BACKBONES[name]
    model = model_lib.create_model(name, 3, SMALLEST_SIZE, 0.2, weights=None, augment=False,
                                   seed=0)
    layers = model_lib.get_backbone(model).layers
    assert 0 < spec.fine_tune_at < len(layers)
    if name != "demo_cnn":
        # The recipe's MobileNetV2 value, 100 of 154 layers, is the yardstick:
        # about the last third of the backbone fine-tunes.
        assert 0.6 <= spec.fine_tune_at / len(layers) <= 0.7, len(layers)

    model_lib.set_trainable_for_phase(model, 2, spec.fine_tune_at)
    assert not any(layer.trainable_weights for layer in layers[:spec.fine_tune_at])
    tuned = [w for layer in layers[spec.fine_tune_at:] for w in layer.trainable_weights]
    assert tuned, "phase 2 would train no backbone weight"

    loss, metrics = model_lib.loss_and_metrics(3)
    # Eager: tracing a large backbone's train step takes several times longer
    # than running it; the compiled path runs in the end-to-end jobs.
    model.compile(keras.optimizers.RMSprop(1e-3), loss=loss, metrics=metrics, run_eagerly=True)
    before = [w.numpy() for w in tuned]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, SMALLEST_SIZE, SMALLEST_SIZE, 3)).astype(np.float32)
    result = model.train_on_batch(images, np.array([0, 2]), return_dict=True)
    assert np.isfinite(result["loss"])
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, tuned))


@pytest.mark.parametrize("argv, expected", [
    (["--backbone=resnet50_v2"], model_lib.BACKBONES["resnet50_v2"].fine_tune_at),
    ([], 100),  # mobilenet_v2: the recipe.
    (["--backbone=resnet50_v2", "--fine_tune_at=7"], 7),
])
def test_fine_tune_at_defaults_to_the_backbones_own(shapes_dir, argv, expected):
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["prog", f"--data_dir={shapes_dir}", "--weights=none"] + argv)
    config = config_lib.config_from_flags(flag_values, environ={})
    assert config.fine_tune_at == expected
