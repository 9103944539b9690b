"""Shared fixtures: generated image folders, tiny run configurations, a Cloud Storage emulator.

TensorFlow is configured once here, before any test touches it: the CPU is
split into two logical devices so MirroredStrategy can run two replicas.

The suite runs on two pytest-xdist workers (pytest.ini); tests/scheduling.py
keeps tests that share a costly fixture on one worker and sends the costliest
work first. tests/fault_table.py gathers test_faults.py's table.
"""

import trainer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)

import gcs_emulator  # tests/gcs_emulator.py

# TensorFlow reads its GCS_* settings once, at import: few retries, no stat cache.
gcs_emulator.set_tensorflow_gcs_defaults()

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import config as config_lib
from trainer.data import demo as demo_data

import learnable  # tests/learnable.py

pytest_plugins = ("scheduling", "fault_table")  # tests/scheduling.py, tests/fault_table.py

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

TINY_SIZE = 32


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """Three classes of 32-px JPEG shapes: train 12, validation 6 per class."""
    root = tmp_path_factory.mktemp("shapes")
    return demo_data.write_dataset(str(root), demo_data.TARGET_CLASSES,
                                   {"train": 12, "validation": 6}, size=TINY_SIZE, seed=1)


@pytest.fixture(scope="session")
def binary_dir(tmp_path_factory):
    """Two classes (circle, square) of 32-px JPEGs: train 12, validation 6, test 4 per class."""
    root = tmp_path_factory.mktemp("binary")
    return demo_data.write_dataset(str(root), ("circle", "square"),
                                   {"train": 12, "validation": 6, "test": 4},
                                   size=TINY_SIZE, seed=2)


@pytest.fixture(scope="session")
def colour_dir(tmp_path_factory):
    """Three colour classes of 32-px JPEG shapes that a short run learns (tests/learnable.py)."""
    return learnable.write_dataset(str(tmp_path_factory.mktemp("colours")))


def tiny_config(data_dir, job_dir, **overrides):
    """A tiny, fast, validated Config: weights=none, 32 px, one epoch per phase."""
    values = dict(
        data_dir=data_dir, image_size=TINY_SIZE, batch_size=4, epochs=1,
        fine_tune_epochs=1, fine_tune_at=100, learning_rate=1e-3,
        fine_tune_learning_rate=1e-4, dropout=0.2, optimizer="adam",
        fine_tune_optimizer="rmsprop", backbone="mobilenet_v2",
        weights="none", augment=True, strategy="one_device", tpu="", seed=0,
        checkpoint_every_steps=0, test_fraction=0.2, cache="memory",
        shuffle_buffer=100)
    values.update(overrides)
    dirs = config_lib.resolve_output_dirs(str(job_dir), environ={})
    config = config_lib.Config(**{**values, **dirs})
    config_lib.validate(config)
    return config


def optimizer_iterations(backup_dir):
    """The optimizer's iteration count in a phase's latest backup (the chief's)."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{backup_dir}/chief"))
    key = next(k for k in reader.get_variable_to_shape_map() if "optimizer/_iterations" in k)
    return int(reader.get_tensor(key))


@pytest.fixture
def make_config(tmp_path):
    """Factory of tiny_config()s, by default in this test's tmp_path/job."""

    def make(data_dir, job_dir=None, **overrides):
        return tiny_config(data_dir, job_dir or tmp_path / "job", **overrides)

    return make


FOUR_CLASSES = ("circle", "square", "star", "triangle")


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory):
    """A finished tiny 4-class job, trained once per session: (config, metrics).

    demo_cnn with weights=none, one epoch per phase, with the options users
    turn on (cosine schedule after warmup, label smoothing, early stopping,
    TFLite export), for the tests that read what a job leaves behind: the
    model, metrics.json, TensorBoard logs, learning curves and TFLite files.
    """
    from trainer import cluster
    from trainer import train

    root = tmp_path_factory.mktemp("four_classes")
    data_dir = demo_data.write_dataset(str(root / "data"), FOUR_CLASSES,
                                       {"train": 4, "validation": 2, "test": 2},
                                       size=TINY_SIZE, seed=3)
    config = tiny_config(data_dir, root / "job", backbone="demo_cnn", fine_tune_at=5,
                         lr_schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1,
                         early_stopping_patience=2, export_tflite=True)
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    return config, metrics


@pytest.fixture(scope="session")
def learned_job(colour_dir, tmp_path_factory):
    """A job that learned: the colour task on the default (cached) path, one device,
    with TFLite and ONNX export, each measured: (config, metrics). See tests/learnable.py."""
    from trainer import cluster
    from trainer import train

    config = tiny_config(colour_dir, tmp_path_factory.mktemp("learned") / "job",
                         export_tflite=True, export_onnx=True, **learnable.SETTINGS)
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    return config, metrics


GCS_BUCKET = "test-bucket"


@pytest.fixture(scope="session")
def gcs():
    """A local Cloud Storage emulator with bucket GCS_BUCKET (see tests/gcs_emulator.py).

    While it runs, TensorFlow's gs:// and google-cloud-storage in this process
    reach it; tests write under gs://test-bucket/<their own prefix>.
    """
    with gcs_emulator.GcsEmulator() as emulator:
        emulator.create_bucket(GCS_BUCKET)
        yield emulator


@pytest.fixture
def gcs_dir(gcs, request):
    """A gs:// folder of this test's own, in the emulator's bucket."""
    return f"gs://{GCS_BUCKET}/{request.node.name}"
