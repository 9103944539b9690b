"""The first errors a new user meets: offline ImageNet weights, a missing bucket, no credentials.

Each must be one message naming the flag or path and the way out, before any
data is read (trainer/preflight.py). Offline is made certain with an
``https_proxy`` on a closed port (urllib and Keras's download honour it) and
an empty ``HOME`` (Keras's cache, ~/.keras/models). Cloud Storage is the
emulator behind TF's own gs:// client (tests/gcs_emulator.py), and for the
refusals of a private bucket the refusing stand-in of tests/gcs_refusing.py.
"""

import os
import subprocess
import time

import pytest

from gcs_refusing import RefusingGcs
from test_task import REPO, _command, _env, _parse
from trainer import model as model_lib
from trainer import preflight
from workers import free_ports

MOBILENET_160 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"
MOBILENET_224 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """This process offline with an empty Keras cache; returns the environment for a child."""
    home = tmp_path / "home"
    home.mkdir()
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    changes = {"HOME": str(home), "https_proxy": closed, "HTTPS_PROXY": closed,
               "no_proxy": "", "NO_PROXY": ""}
    for name, value in changes.items():
        monkeypatch.setenv(name, value)
    return {**_env(), **changes}


def test_offline_default_weights_fail_before_any_data_naming_the_way_out(binary_dir, tmp_path,
                                                                         offline):
    job_dir = tmp_path / "job"
    started = time.monotonic()
    result = subprocess.run(_command(f"--data_dir={binary_dir}", f"--job_dir={job_dir}"),
                            cwd=REPO, env=offline, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    err = result.stderr
    assert "--weights=imagenet" in err and "~/.keras/models" in err, err[-2000:]
    # --recipe=auto may choose either side: both files are named.
    assert MOBILENET_160 in err and MOBILENET_224 in err
    assert "--weights=/path/to/weights.h5" in err and "--weights=none" in err
    assert "URL fetch failure" not in err and "Traceback" not in err
    assert not job_dir.exists()  # Nothing written, no image read.
    print(f"offline --weights=imagenet refused after {seconds:.1f} s")


def test_cached_imagenet_weights_need_no_network(offline):
    cache = os.path.join(os.environ["HOME"], ".keras", "models")
    with pytest.raises(preflight.PreflightError, match=MOBILENET_160):
        preflight.check_imagenet_weights("mobilenet_v2", [160])
    os.makedirs(cache)
    open(os.path.join(cache, MOBILENET_160), "wb").close()
    preflight.check_imagenet_weights("mobilenet_v2", [160])  # Offline, and no error.
    with pytest.raises(preflight.PreflightError, match=MOBILENET_224):
        preflight.check_imagenet_weights("mobilenet_v2", [160, 224])


def test_a_later_download_failure_gets_the_same_message(offline):
    with pytest.raises(preflight.PreflightError, match=r"--weights=imagenet.*~/.keras/models"):
        with preflight.explain_weights_download("mobilenet_v2", 96):
            model_lib.create_model("mobilenet_v2", 2, 96, 0.2, weights="imagenet")


def test_a_bucket_that_does_not_exist_is_named(gcs, gcs_dir, binary_dir):
    with pytest.raises(preflight.PreflightError,
                       match=r"--job_dir=gs://no-such-bucket-15/job: the bucket "
                             r"gs://no-such-bucket-15 does not exist.*gcloud storage buckets"):
        preflight.check_gcs_paths({"--job_dir": "gs://no-such-bucket-15/job"})
    with pytest.raises(preflight.PreflightError, match="--data_dir=gs://no-such-bucket-15/data"):
        _parse(["--data_dir=gs://no-such-bucket-15/data", "--weights=none"])
    preflight.check_gcs_paths({"--job_dir": f"{gcs_dir}/not/yet/there"})  # The bucket exists.


def test_credentials_without_access_are_named(gcs, monkeypatch):
    with RefusingGcs() as refusing:
        for name, value in refusing.environ().items():
            monkeypatch.setenv(name, value)
        with pytest.raises(preflight.PreflightError) as raised:
            preflight.check_gcs_paths({"--data_dir": "gs://private-bucket/data"})
    message = str(raised.value)
    assert message.startswith("--data_dir=gs://private-bucket/data: Cloud Storage refused")
    assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" in message and "403" in message
    assert "gcloud auth application-default login" in message


def test_no_credentials_is_named_with_gcloud_login(tmp_path):
    """No credentials anywhere: TF tries the metadata server, then goes anonymous; 401."""
    home = tmp_path / "home"
    home.mkdir()
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    with RefusingGcs() as refusing:
        env = {**_env(), **refusing.environ(), "HOME": str(home),
               "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed}
        for name in ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS",
                     "CLOUDSDK_CONFIG"):
            env.pop(name, None)
        started = time.monotonic()
        result = subprocess.run(
            _command("--data_dir=gs://private-bucket/data", f"--job_dir={tmp_path / 'job'}",
                     "--weights=none"),
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        seconds = time.monotonic() - started
    err = result.stderr
    assert result.returncode != 0
    assert "--data_dir=gs://private-bucket/data: Cloud Storage refused access, and no Google " \
           "Cloud credentials were found" in err, err[-3000:]
    assert "401" in err and "gcloud auth application-default login" in err
    assert "Traceback" not in err
    assert not (tmp_path / "job").exists()
    print(f"no credentials refused after {seconds:.1f} s")


def test_prepare_names_a_missing_input_bucket(gcs, tmp_path):
    from absl import app
    from absl import flags

    from trainer import prepare as prepare_cli

    fv = flags.FlagValues()
    prepare_cli.define_flags(fv)
    fv(["prepare", "--input_dir=gs://no-such-bucket-15/images",
        f"--output_dir={tmp_path / 'out'}"])
    with pytest.raises(app.UsageError, match="--input_dir=gs://no-such-bucket-15/images: the "
                                             "bucket gs://no-such-bucket-15 does not exist"):
        prepare_cli.run(fv)
    assert not (tmp_path / "out").exists()
