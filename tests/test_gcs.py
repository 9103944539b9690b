"""gs:// end to end, through TensorFlow's own Cloud Storage client and the local emulator.

prepare reads images from and writes records to gs://, and a whole training
job reads those records and writes its checkpoints, TensorBoard logs,
config, metrics and SavedModel to gs://. What they leave is listed with
google-cloud-storage, the second, independent client of the same emulator.
"""

import os
import subprocess
import sys

import pytest
import tensorflow as tf
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from trainer import cluster
from trainer import train
from trainer.data import prepare as prepare_lib
from trainer.data import records


def _client() -> storage.Client:
    # STORAGE_EMULATOR_HOST (set by the gcs fixture) points it at the emulator.
    return storage.Client(project="test", credentials=AnonymousCredentials())


def _objects(gcs_folder: str):
    """Object names below a gs:// folder, relative to it."""
    bucket, _, prefix = gcs_folder[len("gs://"):].partition("/")
    return sorted(blob.name[len(prefix) + 1:]
                  for blob in _client().list_blobs(bucket, prefix=prefix + "/"))


def _upload_folder(local: str, gcs_folder: str) -> None:
    bucket_name, _, prefix = gcs_folder[len("gs://"):].partition("/")
    bucket = _client().bucket(bucket_name)
    for directory, _, names in os.walk(local):
        for name in names:
            path = os.path.join(directory, name)
            bucket.blob(f"{prefix}/{os.path.relpath(path, local)}").upload_from_filename(path)


def _shard_bytes(folder: str, manifest):
    return {shard: tf.io.gfile.GFile(f"{folder}/{shard}", "rb").read()
            for info in manifest["splits"].values() for shard in info["shards"]}


OPTIONS = prepare_lib.Options(min_shards=2, workers=2, progress=False)


@pytest.fixture(scope="module")
def gcs_records(gcs, binary_dir):
    """binary_dir uploaded with google-cloud-storage and prepared gs:// to gs://."""
    root = "gs://test-bucket/records_fixture"
    _upload_folder(binary_dir, f"{root}/images")
    result = prepare_lib.prepare(f"{root}/images", f"{root}/prepared", OPTIONS)
    assert result.ok, result.errors
    return f"{root}/prepared"


def test_prepare_from_and_to_gcs_matches_a_local_run(gcs_records, binary_dir, tmp_path):
    local = prepare_lib.prepare(binary_dir, str(tmp_path / "prepared"), OPTIONS)
    remote = records.read_manifest(gcs_records)
    assert remote["splits"] == local.manifest["splits"]
    assert remote["source"]["fingerprint"] == local.manifest["source"]["fingerprint"]
    assert _shard_bytes(gcs_records, remote) == _shard_bytes(str(tmp_path / "prepared"),
                                                             local.manifest)
    names = _objects(gcs_records)
    assert records.MANIFEST in names and records.REPORT in names
    assert not [name for name in names if ".tmp-" in name]  # Every temporary name renamed.
    assert {name for name in names if name.endswith(".tfrecord")} == {
        shard for info in remote["splits"].values() for shard in info["shards"]}


def test_rerun_on_gcs_is_up_to_date(gcs_records):
    images = gcs_records.rsplit("/", 1)[0] + "/images"
    assert prepare_lib.prepare(images, gcs_records, OPTIONS).up_to_date


def test_training_job_reads_and_writes_gcs(gcs_records, gcs_dir, make_config):
    job_dir = f"{gcs_dir}/job"
    config = make_config(gcs_records, job_dir, backbone="demo_cnn", fine_tune_at=5)
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))

    assert metrics["validation"]["count"] == 12 and metrics["test"]["count"] == 8
    names = _objects(job_dir)
    assert "config.json" in names and "metrics.json" in names
    assert "model/1/saved_model.pb" in names and "model/1/class_names.json" in names
    assert any(n.startswith("model/1/variables/variables.data") for n in names)
    assert metrics["model"] == f"{job_dir}/model/1"
    assert any(n.startswith("checkpoints/phase1/") for n in names)
    assert any(n.startswith("checkpoints/phase2/") for n in names)
    assert any(n.startswith("logs/train/events.out.tfevents") for n in names)
    assert any(n.startswith("logs/validation/events.out.tfevents") for n in names)
    assert not [n for n in names if n.startswith(("model.partial/", "model.previous/"))]
    served = tf.saved_model.load(f"{job_dir}/model/1").signatures["serving_images"]
    assert served(images=tf.zeros([1, 32, 32, 3]))["probabilities"].shape == (1, 2)


def test_gs_weights_are_read_from_a_local_copy_that_is_removed_after(gcs, tmp_path):
    source = tmp_path / "weights.h5"
    source.write_bytes(b"not really h5")
    _client().bucket("test-bucket").blob("weights/backbone.h5").upload_from_filename(str(source))
    with train._local_weights("gs://test-bucket/weights/backbone.h5") as local:
        assert not local.startswith("gs://")
        with open(local, "rb") as f:
            assert f.read() == b"not really h5"
    assert not os.path.exists(local) and not os.path.exists(os.path.dirname(local))


@pytest.mark.parametrize("given, expected", [(None, "16"), ("64", "64")])
def test_importing_the_trainer_sets_the_gs_read_block_size_unless_given(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "GCS_READ_CACHE_BLOCK_SIZE_MB"}
    if given:
        env["GCS_READ_CACHE_BLOCK_SIZE_MB"] = given
    out = subprocess.run(
        [sys.executable, "-c",
         "import os, trainer; print(os.environ['GCS_READ_CACHE_BLOCK_SIZE_MB'])"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
