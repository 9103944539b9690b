"""The command line: flag errors before any work, and resume after a kill.

These run ``python -m trainer.task`` in real subprocesses, as Vertex AI and
users do.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from absl import flags

from conftest import optimizer_iterations
from workers import Job
from trainer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*args):
    return [sys.executable, "-m", "trainer.task", *args]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    return env


def _parse(argv, environ=None):
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["trainer", *argv])
    return config_lib.config_from_flags(fv, environ=environ or {})


@pytest.mark.parametrize("argv, flag", [
    (["--image_size=8"], "image_size"),
    (["--batch_size=0"], "batch_size"),
    (["--epochs=-1"], "epochs"),
    (["--epochs=0", "--fine_tune_epochs=0"], "epochs"),
    (["--learning_rate=0"], "learning_rate"),
    (["--fine_tune_learning_rate=-1"], "fine_tune_learning_rate"),
    (["--dropout=1.0"], "dropout"),
    (["--backbone=vgg1"], "backbone"),
    (["--weights=/no/such/file.h5"], "weights"),
    (["--test_fraction=1.5"], "test_fraction"),
    (["--tpu=node-1", "--strategy=mirrored"], "tpu"),
    (["--data_dir=/no/such/folder"], "data_dir"),
    (["--cache_spill_dir=gs://bucket/spill"], "cache_spill_dir"),
    (["--cache_dir=/proc/no_cache_here"], "cache_dir"),
])
def test_invalid_flags_name_the_flag(argv, flag, binary_dir):
    if not any(a.startswith("--data_dir") for a in argv):
        argv = [f"--data_dir={binary_dir}", *argv]
    with pytest.raises(config_lib.ConfigError, match=f"--{flag}"):
        _parse(argv)


def test_data_dir_without_splits_is_refused(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(config_lib.ConfigError, match="train/"):
        _parse([f"--data_dir={tmp_path}"])


def test_no_data_dir_selects_the_demo_preset_without_overriding_given_flags():
    config = _parse(["--epochs=2"])
    assert config.demo and config.backbone == "demo_cnn"
    assert config.epochs == 2
    assert config.weights == config_lib.DEMO_SOURCE_WEIGHTS


def test_vertex_output_dirs_are_used(binary_dir):
    environ = {"AIP_MODEL_DIR": "gs://b/out/model/", "AIP_CHECKPOINT_DIR": "gs://b/out/checkpoints/",
               "AIP_TENSORBOARD_LOG_DIR": "gs://b/out/logs/"}
    config = _parse([f"--data_dir={binary_dir}"], environ)
    assert config.model_dir == "gs://b/out/model"
    assert config.checkpoint_dir == "gs://b/out/checkpoints"
    assert config.log_dir == "gs://b/out/logs"
    assert config.job_dir == "gs://b/out"


def test_cli_rejects_a_bad_flag_before_building_anything(binary_dir, tmp_path):
    job_dir = tmp_path / "job"
    result = subprocess.run(
        _command(f"--data_dir={binary_dir}", f"--job_dir={job_dir}", "--dropout=2"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--dropout=2.0 must be in [0, 1)" in result.stderr
    assert not job_dir.exists()


def test_cli_tpu_without_a_tpu_fails_clearly(binary_dir, tmp_path):
    result = subprocess.run(
        _command(f"--data_dir={binary_dir}", f"--job_dir={tmp_path}", "--tpu=no-such-tpu",
                 "--weights=none"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--strategy=tpu: no TPU reachable" in result.stderr


def _run_until(args, marker, log):
    """Runs the trainer and kills it (SIGKILL) once an output line contains ``marker``.

    Every wait is bounded (tests/workers.py): a trainer that stalls fails the
    test instead of hanging it.
    """
    with Job(args, 1, log) as job:
        job.chief.wait_for(re.escape(marker), 300)
        job.signal(signal.SIGKILL)
        assert job.wait(60) == [-signal.SIGKILL], job.chief.tail()
    return job.chief.output


def test_killed_job_resumes_in_each_phase(binary_dir, tmp_path):
    """kill -9 in phase 1, then in phase 2: each restart continues the epoch count."""
    job_dir = tmp_path / "job"
    args = [f"--data_dir={binary_dir}", f"--job_dir={job_dir}", "--weights=none",
            "--image_size=32", "--batch_size=4", "--epochs=3", "--fine_tune_epochs=2",
            "--fine_tune_at=140", "--augment=false", "--recipe=tutorial"]
    log = str(tmp_path / "worker.log")
    _run_until(args, "Epoch 2/3", log)
    second = _run_until(args, "Epoch 5/5", log)
    assert "Epoch 1/3" not in second and "Epoch 2/3" in second
    final = subprocess.run(_command(*args), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "Epoch 4/5" not in final.stdout and "Epoch 5/5" in final.stdout
    steps = 6  # 24 train images / batch 4.
    assert optimizer_iterations(f"{job_dir}/checkpoints/phase1") == 3 * steps
    assert optimizer_iterations(f"{job_dir}/checkpoints/phase2") == 2 * steps
    assert (job_dir / "model" / "1" / "saved_model.pb").exists()
