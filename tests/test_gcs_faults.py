"""Cloud Storage faults: prepare, a training job and the export ride through them.

The emulator's proxy (tests/gcs_faults.py) answers a share of the requests
of each kind with 429, 500 or 503, cuts replies mid-body with a connection
reset, or sends them slowly, deterministically by seed. TensorFlow's gs://
client retries each (here 2 retries with 100 ms back-off, conftest.py; 10 by
default, trainer/storage.py). Each test asserts that faults really were
injected into every kind it names, that the outputs equal a clean run's
(shards and models byte for byte, metrics exactly: one device, same seed),
and, for a fault that outlasts the retries, a clear error naming what
failed while the previous state stays valid.

Every fault costs the client up to a second of back-off, so each rule has a
``limit``: these tests add seconds of retries, not minutes.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from conftest import optimizer_iterations
from trainer import cluster
from trainer import export
from trainer import model as model_lib
from trainer import train
from trainer.data import prepare as prepare_lib
from trainer.data import records

TRANSIENT = ["429", "500", "503", "reset", "slow"]
OPTIONS = prepare_lib.Options(min_shards=2, workers=2, progress=False)
ROOT = "gs://test-bucket/gcs_faults"


# Kinds with few requests in a run are faulted from their first request on.
FEW = ("compose", "delete")


def _transient(limits, rate=0.3):
    """One rule per kind: that share of its requests faulted, at most ``limit`` in all."""
    return [{"kinds": [kind], "faults": TRANSIENT, "rate": 1.0 if kind in FEW else rate,
             "limit": limit, "max_in_a_row": 2} for kind, limit in limits.items()]


def _outage(kind, after=0):
    """Every request of ``kind`` after ``after`` of them answers 503: past any retry."""
    return [{"kinds": [kind], "faults": ["503"], "after": after, "after_kind": kind,
             "max_in_a_row": None}]


def _bytes(folder):
    return {path[len(folder):]: tf.io.gfile.GFile(path, "rb").read()
            for d, _, names in tf.io.gfile.walk(folder)
            for path in [f"{d.rstrip('/')}/{n}" for n in names]}


def _shards(folder):
    return {name: data for name, data in _bytes(folder).items() if name.endswith(".tfrecord")}


def _assert_injected(counts, kinds):
    for kind in kinds:
        assert counts["injected"].get(kind), (kind, counts)


@pytest.fixture(scope="module")
def images(gcs, binary_dir):
    """binary_dir uploaded with google-cloud-storage (no faults: the second client)."""
    bucket = storage.Client(project="test", credentials=AnonymousCredentials()).bucket(
        "test-bucket")
    for directory, _, names in os.walk(binary_dir):
        for name in names:
            path = os.path.join(directory, name)
            bucket.blob(f"gcs_faults/images/{os.path.relpath(path, binary_dir)}"
                        ).upload_from_filename(path)
    return f"{ROOT}/images"


@pytest.fixture(scope="module")
def clean_records(images):
    result = prepare_lib.prepare(images, f"{ROOT}/clean", OPTIONS)
    assert result.ok
    return f"{ROOT}/clean"


def test_prepare_rides_through_faults_and_writes_the_same_shards(gcs, images, clean_records):
    faulted = f"{ROOT}/faulted"
    kinds = {"list": 2, "stat": 2, "read": 3, "write": 3, "compose": 2, "delete": 2}
    with gcs.faults(_transient(kinds), seed=1, slow_s=0.2) as counts:
        result = prepare_lib.prepare(images, faulted, OPTIONS)
    assert result.ok, result.errors
    _assert_injected(counts, kinds)
    clean = _shards(clean_records)
    assert clean and _shards(faulted) == clean  # Byte for byte.
    assert records.read_manifest(faulted)["splits"] == records.read_manifest(clean_records)["splits"]
    print(f"prepare: {sum(map(len, clean.values()))} shard bytes equal; injected "
          f"{counts['injected']}")


def test_prepare_through_a_write_outage_fails_clearly_and_a_rerun_completes(
        gcs, images, clean_records):
    output = f"{ROOT}/outage"
    with gcs.faults(_outage("write", after=2)):
        with pytest.raises(tf.errors.OpError, match=f"Preparing {images} into {output} failed.*"
                                                    "The manifest is written only after every shard"):
            prepare_lib.prepare(images, output, OPTIONS)
    assert not tf.io.gfile.exists(f"{output}/{records.MANIFEST}")  # Not taken for data.
    assert prepare_lib.prepare(images, output, OPTIONS).ok
    assert _shards(output) == _shards(clean_records)


# ------------------------------------------------------------ Training


def _job(records_dir, job_dir, make_config):
    config = make_config(records_dir, job_dir, backbone="demo_cnn", fine_tune_at=5,
                         epochs=2, fine_tune_epochs=0, checkpoint_every_steps=2)
    return config, lambda: train.train_and_evaluate(config, cluster.create_strategy("one_device"))


@pytest.fixture(scope="module")
def clean_job(gcs, clean_records):
    """A clean run: (config, metrics, its requests by kind)."""
    from conftest import tiny_config

    config = tiny_config(clean_records, f"{ROOT}/clean_job", backbone="demo_cnn",
                         fine_tune_at=5, epochs=2, fine_tune_epochs=0, checkpoint_every_steps=2)
    gcs.reset_counts()
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    return config, metrics, gcs.stats()["forwarded"]


def test_training_job_rides_through_faults_with_the_same_results(gcs, clean_job, make_config):
    clean_config, clean, _ = clean_job
    kinds = {"list": 2, "stat": 2, "read": 2, "write": 3, "compose": 2, "delete": 1}
    config, run = _job(clean_config.data_dir, f"{ROOT}/faulted_job", make_config)
    with gcs.faults(_transient(kinds, rate=0.2), seed=2, slow_s=0.2) as counts:
        metrics = run()
    _assert_injected(counts, kinds)
    np.testing.assert_allclose(metrics["history"]["loss"], clean["history"]["loss"], rtol=1e-5)
    for split in ("validation", "test"):
        assert metrics[split]["accuracy"] == clean[split]["accuracy"]
        assert metrics[split]["confusion_matrix"] == clean[split]["confusion_matrix"]
    assert optimizer_iterations(f"{config.checkpoint_dir}/phase1") == 12
    # The exported model, as a clean run's: same files, same variables.
    served, clean_served = metrics["model"], clean["model"]
    ours, theirs = _bytes(served), _bytes(clean_served)
    assert sorted(ours) == sorted(theirs)
    for name in ("/variables/variables.index", "/class_names.json"):
        assert ours[name] == theirs[name]
    print(f"training job: losses within 1e-5, accuracies equal; injected {counts['injected']}")


def test_a_backup_through_an_outage_fails_clearly_and_the_rerun_resumes(gcs, clean_job,
                                                                        make_config):
    clean_config, _, requests = clean_job
    config, run = _job(clean_config.data_dir, f"{ROOT}/outage_job", make_config)
    # TensorFlow's checkpoint renames ckpt-N_temp into place by copying each
    # object (a "compose" kind request, nothing else in the job copies);
    # halfway through the clean run's copies, every copy starts failing.
    with gcs.faults(_outage("compose", after=requests["compose"] // 2)):
        with pytest.raises(tf.errors.OpError, match=r"Phase 1: backing up to .* failed.*"
                                                    "The previous backup is intact"):
            run()
    in_force = optimizer_iterations(f"{config.checkpoint_dir}/phase1")
    assert 0 < in_force < 12
    metrics = run()  # The same job again, storage healthy.
    assert optimizer_iterations(f"{config.checkpoint_dir}/phase1") == 12
    assert metrics["validation"]["count"] == 12
    print(f"backup outage: failed with the backup of step {in_force} in force; "
          "the rerun resumed from it and finished")


# ------------------------------------------------------------ Export


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    model = model_lib.create_model("demo_cnn", 2, 32, 0.2, weights=None, seed=0)
    return export.stage_model(model, ["circle", "square"], 32,
                              str(tmp_path_factory.mktemp("staged") / "model"))


def test_export_rides_through_faults_and_an_outage_leaves_the_previous_model(gcs, staged):
    deploy = f"{ROOT}/export/model"
    kinds = {"list": 2, "stat": 2, "write": 3, "delete": 1}
    export.publish(staged, deploy)
    with gcs.faults(_transient(kinds), seed=3, slow_s=0.2) as counts:
        assert export.publish(staged, deploy) == f"{deploy}/2"
    _assert_injected(counts, ["list", "stat", "write"])
    local = {f"/{os.path.relpath(os.path.join(d, n), staged)}": open(os.path.join(d, n), "rb").read()
             for d, _, names in os.walk(staged) for n in names}
    assert _bytes(f"{deploy}/2") == local

    with gcs.faults(_outage("write", after=3)):
        with pytest.raises(tf.errors.OpError, match=f"Exporting the model to {deploy}/3 failed"
                                                    f".*{deploy} still resolves to the previous"):
            export.publish(staged, deploy)
    assert export.resolve_model_dir(deploy) == f"{deploy}/2"
    assert _bytes(f"{deploy}/2") == local
