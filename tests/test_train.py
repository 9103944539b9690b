"""End to end: the real train_and_evaluate on generated JPEGs, and what it leaves behind."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tensorboard.backend.event_processing import event_accumulator

from conftest import optimizer_iterations, tiny_config
from trainer import cluster
from trainer import export
from trainer import model as model_lib
from trainer import train
from trainer.data import pipeline


def _scalars(log_dir):
    """{tag: [(step, value)]} of an event folder, read by TensorBoard's own reader."""
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def _backbone_with_random_statistics(path):
    """A MobileNetV2 backbone whose BatchNorm moving statistics are random, saved to
    ``path``; returns (the backbone, {variable name: value})."""
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                          weights=None)
    rng = np.random.default_rng(0)
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))
    base.save_weights(path)
    return base, {v.name: v.numpy() for v in base.weights}


@pytest.fixture(scope="module")
def random_statistics_weights(tmp_path_factory):
    """A MobileNetV2 weights file whose BatchNorm statistics are random: (path, backbone,
    {variable name: value})."""
    path = str(tmp_path_factory.mktemp("weights") / "base.h5")
    return (path, *_backbone_with_random_statistics(path))


@pytest.fixture(scope="module")
def finished_run(binary_dir, random_statistics_weights, tmp_path_factory):
    """One two-phase run (one epoch each) on the binary set, shared by the tests below:
    MobileNetV2 from ``random_statistics_weights`` on the default (cached) paths."""
    job_dir = tmp_path_factory.mktemp("run")
    config = tiny_config(binary_dir, job_dir, weights=random_statistics_weights[0])
    metrics = train.train_and_evaluate(config, tf.distribute.get_strategy())
    return config, metrics


def test_checkpoints_of_both_phases_exist(finished_run):
    """Each phase's backup holds its own optimizer: one epoch of 6 steps (24 images, batch 4)."""
    config, _ = finished_run
    for phase in (1, 2):
        assert optimizer_iterations(f"{config.checkpoint_dir}/phase{phase}") == 6


def test_tensorboard_has_epoch_scalars_and_phase_two_continues(finished_run):
    config, _ = finished_run
    train_scalars = _scalars(f"{config.log_dir}/train")
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_phase",
                "epoch_images_per_second"):
        assert tag in train_scalars, sorted(train_scalars)
    assert [step for step, _ in train_scalars["epoch_loss"]] == [0, 1]
    assert [value for _, value in train_scalars["epoch_phase"]] == [1.0, 2.0]
    lrs = [value for _, value in train_scalars["epoch_learning_rate"]]
    assert lrs == pytest.approx([1e-3, 1e-4])
    assert all(v > 0 for _, v in train_scalars["epoch_images_per_second"])
    validation = _scalars(f"{config.log_dir}/validation")
    assert [step for step, _ in validation["epoch_accuracy"]] == [0, 1]


def test_saved_model_classifies_jpeg_bytes_with_class_names(finished_run, binary_dir):
    config, _ = finished_run
    loaded = tf.saved_model.load(export.resolve_model_dir(config.model_dir))
    paths = tf.io.gfile.glob(f"{binary_dir}/test/*/*.jpg")[:3]
    images = tf.constant([tf.io.gfile.GFile(p, "rb").read() for p in paths])
    out = loaded.signatures["serving_default"](image_bytes=images)
    assert out["probabilities"].shape == (3, 2)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert set(out["label"].numpy().tolist()) <= {b"circle", b"square"}
    assert out["class_names"].numpy()[0].tolist() == [b"circle", b"square"]
    with tf.io.gfile.GFile(f"{export.resolve_model_dir(config.model_dir)}/{export.CLASS_NAMES_FILE}") as f:
        assert json.load(f) == ["circle", "square"]


def test_metrics_json_matches_evaluating_the_exported_model(finished_run, binary_dir):
    config, metrics = finished_run
    with tf.io.gfile.GFile(f"{config.job_dir}/metrics.json") as f:
        written = json.load(f)
    assert written["test"]["count"] == 8  # The generated test/ split: 4 per class.
    info = pipeline.describe(binary_dir)
    serve = tf.saved_model.load(export.resolve_model_dir(config.model_dir)).signatures["serving_default"]
    correct = 0
    for path, label in zip(info.splits["test"].paths, info.splits["test"].labels):
        out = serve(image_bytes=tf.constant([tf.io.gfile.GFile(path, "rb").read()]))
        correct += int(out["class_index"].numpy()[0] == label)
    assert written["test"]["accuracy"] == pytest.approx(correct / 8)
    assert metrics["test"]["accuracy"] == written["test"]["accuracy"]
    assert "validation" in written
    assert tf.io.gfile.exists(f"{config.job_dir}/config.json")


def test_rerunning_a_finished_job_resumes_to_export(finished_run):
    """Both phases restore as finished: no further training steps run."""
    config, _ = finished_run
    before = optimizer_iterations(f"{config.checkpoint_dir}/phase2")
    train.train_and_evaluate(config, tf.distribute.get_strategy())
    assert optimizer_iterations(f"{config.checkpoint_dir}/phase2") == before
    # One more version, the previous one kept (trainer/export.py).
    assert sorted(tf.io.gfile.listdir(config.model_dir)) == ["1", "2"]
    assert export.resolve_model_dir(config.model_dir) == f"{config.model_dir}/2"


class _ExportReached(Exception):
    """Raised where export would begin: the backbone's weights as training left them."""

    def __init__(self, weights):
        super().__init__("export reached")
        self.weights = weights


def _stop_at_export(model, *args, **kwargs):
    base = model_lib.get_backbone(model)
    raise _ExportReached({v.name: v.numpy() for v in base.weights})


def _assert_statistics_kept(base, before, after, fine_tune_at):
    """Every moving mean/variance as before; weights below ``fine_tune_at`` as before, and
    phase 2 moved BatchNorm scales above it."""
    assert set(after) == set(before)
    moving = [n for n in before if "moving_" in n]
    gammas = [n for n in before if n.endswith("gamma:0")]
    assert moving and gammas
    for name in moving:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    tuned = {v.name for layer in base.layers[fine_tune_at:] for v in layer.weights}
    assert any(not np.array_equal(before[n], after[n]) for n in gammas if n in tuned)
    for name in set(before) - tuned:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_batchnorm_statistics_never_change_through_the_whole_job(finished_run,
                                                                 random_statistics_weights):
    """The default path (phase 1 on cached features, phase 2 on the cached frontier),
    through export and evaluation: the exported backbone keeps every moving statistic."""
    weights, base, before = random_statistics_weights
    config, _ = finished_run
    assert (config.weights, config.fine_tune_at, config.feature_cache,
            config.fine_tune_cache) == (weights, 100, True, True)
    exported = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                              weights=None)
    exported.load_weights(f"{export.resolve_model_dir(config.model_dir)}/{export.BACKBONE_WEIGHTS_FILE}")
    _assert_statistics_kept(base, before, {v.name: v.numpy() for v in exported.weights}, 100)


@pytest.mark.parametrize("fine_tune_at, feature_cache, fine_tune_cache", [
    (100, True, False), (100, False, True), (100, False, False), (0, False, False)])
def test_batchnorm_statistics_never_change(binary_dir, tmp_path, monkeypatch,
                                           random_statistics_weights, fine_tune_at,
                                           feature_cache, fine_tune_cache):
    """Moving mean/variance of the backbone are identical before and after both phases
    on every other path: phase 1 on cached features or on images (the tutorial's path),
    phase 2 on the cached frontier of the frozen layers or on images, and with the
    whole backbone unfrozen.

    These runs stop where the export would begin and check the backbone as
    training left it (the whole job, export included, is checked above): a
    MobileNetV2 export and its reloads cost about 40 s of CPU, its two
    phases here 5 s.
    """
    weights, base, before = random_statistics_weights
    config = tiny_config(binary_dir, tmp_path / "job", weights=weights,
                         fine_tune_at=fine_tune_at, feature_cache=feature_cache,
                         fine_tune_cache=fine_tune_cache)
    monkeypatch.setattr(export, "export_model", _stop_at_export)
    with pytest.raises(_ExportReached) as reached:
        train.train_and_evaluate(config, tf.distribute.get_strategy())
    assert not tf.io.gfile.exists(config.model_dir)
    _assert_statistics_kept(base, before, reached.value.weights, fine_tune_at)


def test_phases_follow_the_recipe():
    from absl import flags
    from trainer import config as config_lib
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["trainer", "--data_dir=unused"])
    values = {name: fv[name].value for name in ("epochs", "fine_tune_epochs", "optimizer",
                                               "fine_tune_optimizer", "learning_rate",
                                               "fine_tune_learning_rate", "fine_tune_at",
                                               "image_size", "batch_size", "dropout")}
    assert values == dict(epochs=10, fine_tune_epochs=10, optimizer="adam",
                          fine_tune_optimizer="rmsprop", learning_rate=1e-4,
                          fine_tune_learning_rate=1e-5, fine_tune_at=100, image_size=160,
                          batch_size=32, dropout=0.2)


def test_fine_tune_epochs_zero_skips_phase_two(binary_dir, tmp_path):
    config = tiny_config(binary_dir, tmp_path, fine_tune_epochs=0)
    assert [p.number for p in train.phases(config)] == [1]
    config = tiny_config(binary_dir, tmp_path, epochs=2, fine_tune_epochs=3)
    assert [(p.first_epoch, p.last_epoch) for p in train.phases(config)] == [(0, 2), (2, 5)]


def test_backbone_is_frozen_in_phase_one_and_partly_unfrozen_in_phase_two():
    model = model_lib.create_model("mobilenet_v2", 2, 32, 0.2, weights=None)
    base = model_lib.get_backbone(model)
    model_lib.set_trainable_for_phase(model, 1, 100)
    assert [w.name for w in model.trainable_weights] == ["logits/kernel:0", "logits/bias:0"]
    model_lib.set_trainable_for_phase(model, 2, 100)
    assert all(not layer.trainable for layer in base.layers[:100])
    assert all(layer.trainable for layer in base.layers[100:])
    assert len(model.trainable_weights) > 2


def test_worker_dir_is_scratch_for_non_chief():
    chief = cluster.ClusterInfo("chief", 0, 2)
    worker = cluster.ClusterInfo("worker", 0, 2)
    assert cluster.worker_dir("gs://b/model", chief) == "gs://b/model"
    assert cluster.worker_dir("gs://b/model", worker) != "gs://b/model"
