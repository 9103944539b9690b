"""The resume guard: a job dir's backups resume only into the run that made them.

One tiny job is trained once (module fixture); every changed re-run is then
the real ``train_and_evaluate`` on that job dir, refused right after the
data is listed, before any image is read (trainer/resume_guard.py).
"""

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from conftest import optimizer_iterations, tiny_config
from test_task import REPO, _command, _env
from trainer import cluster
from trainer import config as config_lib
from trainer import resume_guard
from trainer import train
from trainer.data import demo as demo_data
from trainer.data import screen

STEPS = 6  # 24 train images of binary_dir / batch 4.


def _config(data_dir, job_dir, **changes):
    return tiny_config(data_dir, job_dir, **{
        "backbone": "demo_cnn", "fine_tune_at": 5, "augment": False, "recipe": "tutorial",
        **changes})


@pytest.fixture(scope="module")
def trained(binary_dir, tmp_path_factory):
    """A finished tiny job: (its config, a copy of its job dir as it was)."""
    config = _config(binary_dir, tmp_path_factory.mktemp("guard") / "job")
    train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    pristine = str(tmp_path_factory.mktemp("guard_copy") / "job")
    shutil.copytree(config.job_dir, pristine)
    return config, pristine


@pytest.fixture
def job(trained, tmp_path):
    """A fresh copy of the trained job dir for one test: its config there."""
    config, pristine = trained
    shutil.copytree(pristine, tmp_path / "job")
    return config.replace(**config_lib.resolve_output_dirs(str(tmp_path / "job"), environ={}))


@pytest.fixture(scope="module")
def more_data(binary_dir, tmp_path_factory):
    """binary_dir with one more training image: same classes, another listing."""
    root = str(tmp_path_factory.mktemp("more") / "data")
    shutil.copytree(binary_dir, root)
    extra = demo_data.write_dataset(str(tmp_path_factory.mktemp("extra")), ("circle",),
                                    {"train": 1}, size=32, seed=9)
    shutil.copy(f"{extra}/train/circle/0000.jpg", f"{root}/train/circle/extra.jpg")
    return root


def test_every_config_field_counts_or_is_ignored():
    names = {f.name for f in dataclasses.fields(config_lib.Config)}
    assert set(resume_guard.FIELDS) | set(resume_guard.IGNORED) == names
    assert not set(resume_guard.FIELDS) & set(resume_guard.IGNORED)


CHANGES = {
    "backbone": (dict(backbone="mobilenet_v2"), ["backbone"]),
    "weights": (dict(weights="WEIGHTS_FILE"), ["weights", "weights_content"]),
    "image size": (dict(image_size=48), ["image_size"]),
    "fine_tune_at": (dict(fine_tune_at=3), ["fine_tune_at"]),
    "phase epochs": (dict(fine_tune_epochs=2), ["fine_tune_epochs"]),
    "optimizer": (dict(fine_tune_optimizer="adam"), ["fine_tune_optimizer"]),
    "learning rate": (dict(learning_rate=1e-2), ["learning_rate"]),
    "recipe": (dict(recipe="auto"), ["recipe"]),
    "global batch": (dict(batch_size=8), ["global_batch"]),
    "phase-2 cache": (dict(fine_tune_cache=False), ["fine_tune_cache"]),
    "class names": (dict(data_dir="SHAPES"), ["class_names", "data"]),
    "data listing": (dict(data_dir="MORE"), ["data"]),
}


@pytest.mark.parametrize("category", CHANGES)
def test_a_changed_run_is_refused_naming_each_field(category, job, shapes_dir, more_data,
                                                    tmp_path, monkeypatch):
    changes, fields = CHANGES[category]
    substitutes = {"WEIGHTS_FILE": str(tmp_path / "other.h5"), "SHAPES": shapes_dir,
                   "MORE": more_data}
    changes = {k: substitutes.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    (tmp_path / "other.h5").write_bytes(b"weights of another run")
    monkeypatch.setattr(screen, "screen", _fail_if_called)  # Refused before any image is read.
    with pytest.raises(resume_guard.ResumeMismatch) as raised:
        train.train_and_evaluate(job.replace(**changes), cluster.create_strategy("one_device"))
    message = str(raised.value)
    changed = [line.strip().split(":")[0] for line in message.splitlines()
               if line.startswith("  ")]
    assert changed == fields, message
    assert f"--job_dir={job.job_dir}" in message
    assert "new --job_dir" in message and "--discard_backups" in message
    if category == "fine_tune_at":
        assert "  fine_tune_at: 5 -> 3" in message


def _fail_if_called(*args, **kwargs):
    raise AssertionError("images were read before the resume guard refused")


def test_same_weights_path_with_new_content_is_a_different_run(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"one")
    first = resume_guard._weights_identity(str(path))
    path.write_bytes(b"two")
    assert resume_guard._weights_identity(str(path)) != first


def test_flags_that_do_not_change_the_training_resume(job):
    strategy = cluster.create_strategy("one_device")
    before = optimizer_iterations(f"{job.checkpoint_dir}/phase2")
    irrelevant = job.replace(max_restarts=0, export_tflite=False, checkpoint_every_steps=2,
                             restart_wait_seconds=5.0, cache="none", shuffle_buffer=7,
                             hypertune_metric="val_accuracy", jit_compile=False,
                             strategy="one_device")
    metrics = train.train_and_evaluate(irrelevant, strategy)
    assert metrics["validation"]["count"] == 12
    # Resumed as finished: no step trained again in either phase.
    assert optimizer_iterations(f"{job.checkpoint_dir}/phase1") == STEPS
    assert optimizer_iterations(f"{job.checkpoint_dir}/phase2") == before == STEPS


def test_discard_backups_starts_afresh_and_then_resumes_its_own(job):
    strategy = cluster.create_strategy("one_device")
    changed = job.replace(fine_tune_epochs=2, discard_backups=True)
    metrics = train.train_and_evaluate(changed, strategy)
    # Every epoch trained in this run (1 + 2), none restored from the old backups.
    assert len(metrics["history"]["loss"]) == 3
    assert optimizer_iterations(f"{job.checkpoint_dir}/phase2") == 2 * STEPS
    data = train.pipeline.describe(job.data_dir, seed=0)
    path = f"{job.checkpoint_dir}/{resume_guard.FILE}"
    assert json.load(open(path)) == resume_guard.fingerprint(changed, data, 4)
    # The flag left on (a restart of the same command line) keeps its own backups.
    before = os.path.getmtime(path)
    resume_guard.check(changed, data, 4, cluster.ClusterInfo(), strategy)
    assert os.path.getmtime(path) == before
    assert optimizer_iterations(f"{job.checkpoint_dir}/phase2") == 2 * STEPS


def test_the_command_line_refuses_with_one_message(job):
    result = subprocess.run(
        _command(f"--data_dir={job.data_dir}", f"--job_dir={job.job_dir}", "--weights=none",
                 "--backbone=demo_cnn", "--fine_tune_at=3", "--image_size=32",
                 "--batch_size=4", "--recipe=tutorial"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "  fine_tune_at: 5 -> 3" in result.stderr, result.stderr[-3000:]
    assert "--discard_backups" in result.stderr and "Traceback" not in result.stderr


def test_two_workers_both_refuse_then_discard_together(job, tmp_path):
    """Real MultiWorkerMirrored processes: every worker compares, so both refuse; with
    --discard_backups the chief deletes while the other waits for it, and both finish."""
    from workers import Job

    args = [f"--data_dir={job.data_dir}", f"--job_dir={job.job_dir}", "--weights=none",
            "--backbone=demo_cnn", "--fine_tune_at=3", "--image_size=32", "--batch_size=2",
            "--recipe=tutorial", "--epochs=1", "--fine_tune_epochs=1", "--augment=false",
            "--restart_wait_seconds=60"]
    log = str(tmp_path / "workers.log")
    with Job(args, 2, log) as refused:
        assert refused.wait(240) == [1, 1], refused.chief.tail()
    for worker in refused.workers:
        assert worker.matches(r"  fine_tune_at: 5 -> 3")
    with Job(args + ["--discard_backups"], 2, log) as fresh:
        assert fresh.wait(300) == [0, 0], fresh.chief.tail() + fresh.workers[1].tail()
    assert fresh.chief.matches(r"--discard_backups: .* holds backups of another run")
    recorded = json.load(open(f"{job.checkpoint_dir}/{resume_guard.FILE}"))
    assert recorded["fields"]["fine_tune_at"] == 3 and recorded["fields"]["global_batch"] == 4
    # Phase 2 of one epoch from scratch at global batch 4: 6 steps.
    assert optimizer_iterations(f"{job.checkpoint_dir}/phase2") == STEPS
