"""Vertex AI job specs: every deploy/*.yaml against the real API types, the
validator's own rules on broken specs, submit's dry run, the package sdist,
and the hyperparameter-tuning reporter the tuning spec relies on.

Nothing here talks to Google Cloud: specs are parsed into
google.cloud.aiplatform_v1 messages locally.
"""

import datetime
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import hypertune
import pytest
import yaml
from google.protobuf import json_format

from deploy import submit
from deploy import validate
from trainer import callbacks

REPO = os.path.dirname(validate.DEPLOY_DIR)
SPECS = validate.spec_paths()
OPTIONS = submit.Options(project="my-project", region="us-central1", bucket="gs://my-bucket",
                         image="us-central1-docker.pkg.dev/my-project/trainer/trainer:1",
                         job_name="run-1")
NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def _spec_path(name):
    return os.path.join(validate.DEPLOY_DIR, name)


def _rendered(name):
    """A deploy spec with the sample placeholder values, as a fresh dict."""
    return validate.render(validate.load_spec(_spec_path(name)), validate.SAMPLE_VALUES)


def _json_of(text):
    """The first JSON object in ``text``."""
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


# ------------------------------------------------------- Every spec is valid


def test_deploy_holds_specs():
    assert len(SPECS) >= 9, SPECS


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_spec_is_valid(path):
    kind = validate.validate_file(path)

    tuning = "studySpec" in validate.load_spec(path)
    assert kind == (validate.TUNING_JOB if tuning else validate.CUSTOM_JOB)


def test_specs_cover_every_topology_and_shipping_way():
    features = set()
    for path in SPECS:
        spec = _rendered(os.path.basename(path))
        job_spec = spec.get("trialJobSpec", spec)
        pools = [p for p in job_spec["workerPoolSpecs"] if p]
        features.add(("pools", len(pools)))
        features.update(("machine", p["machineSpec"]["machineType"]) for p in pools)
        features.update(("ships", key) for p in pools for key in p
                        if key in ("containerSpec", "pythonPackageSpec"))
        if job_spec.get("scheduling", {}).get("strategy") == "SPOT":
            features.add(("spot", job_spec["scheduling"].get("restartJobOnWorkerRestart")))
        if "studySpec" in spec:
            features.add(("tuning", tuple(sorted(p["parameterId"]
                                                 for p in spec["studySpec"]["parameters"]))))
    assert {("machine", "g2-standard-8"), ("machine", "a2-highgpu-4g"),
            ("machine", "ct5lp-hightpu-4t"), ("pools", 2), ("pools", 3),
            ("ships", "containerSpec"), ("ships", "pythonPackageSpec"), ("spot", True),
            ("tuning", ("dropout", "fine_tune_at", "learning_rate"))} <= features


def test_validate_cli_reports_every_spec(capsys):
    assert validate.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"{os.path.relpath(p)}: ok" in out for p in SPECS), out


def test_validate_cli_fails_on_a_broken_spec(tmp_path, capsys):
    broken = tmp_path / "gpu_l4.yaml"
    broken.write_text(pathlib.Path(_spec_path("gpu_l4.yaml")).read_text().replace(
        "acceleratorCount: 1", "acceleratorCount: 3"))

    assert validate.main([str(broken)]) == 1
    assert "cannot take NVIDIA_L4 x 3" in capsys.readouterr().out


# --------------------------------------------------- Broken specs are rejected


def _pool0(spec):
    return spec["workerPoolSpecs"][0]


def _args0(spec):
    return _pool0(spec)["containerSpec"]["args"]


def _set(path, value):
    """A mutation setting spec[path...] = value."""
    def mutate(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _rename_key(spec):
    _pool0(spec)["machine_spec"] = _pool0(spec).pop("machineSpec")


BROKEN_CUSTOM_JOBS = {
    "unknown field": (_set(["workerPoolSpecs", 0, "machineSpec", "gpuCount"], 1),
                      'no field named "gpuCount"'),
    "bad enum": (_set(["workerPoolSpecs", 0, "machineSpec", "acceleratorType"], "NVIDIA_L5"),
                 "Invalid enum value NVIDIA_L5"),
    "bad scheduling enum": (_set(["scheduling"], {"strategy": "CHEAP"}),
                            "Invalid enum value CHEAP"),
    "snake_case key": (_rename_key, r"key workerPoolSpecs\[0\]\.machine_spec must be camelCase"),
    "accelerator from another family": (
        _set(["workerPoolSpecs", 0, "machineSpec", "acceleratorType"], "NVIDIA_TESLA_T4"),
        "g2-standard-8 cannot take NVIDIA_TESLA_T4 x 1; it takes NVIDIA_L4 x 1"),
    "too many accelerators": (_set(["workerPoolSpecs", 0, "machineSpec", "acceleratorCount"], 4),
                              "cannot take NVIDIA_L4 x 4"),
    "accelerator without count": (
        _set(["workerPoolSpecs", 0, "machineSpec"],
             {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_TESLA_T4"}),
        "acceleratorType and acceleratorCount go together"),
    "unknown machine family": (_set(["workerPoolSpecs", 0, "machineSpec"],
                                    {"machineType": "x9-giant-1"}),
                               "x9-giant-1 is not a family"),
    "unknown trainer flag": (lambda s: _args0(s).append("--epochz=3"), "epochz"),
    "flag value of the wrong type": (lambda s: _args0(s).append("--epochs=many"),
                                     "--epochs.*many"),
    "flag value out of range": (lambda s: _args0(s).append("--dropout=1.5"),
                                r"--dropout=1.5 must be in \[0, 1\)"),
    "enum flag value": (lambda s: _args0(s).append("--strategy=fastest"), "strategy"),
    "positional trainer arg": (lambda s: _args0(s).append("train"), "not flags"),
    "two chiefs": (_set(["workerPoolSpecs", 0, "replicaCount"], 2),
                   r"workerPoolSpecs\[0\]\.replicaCount must be 1"),
    "no outputs": (lambda s: s.pop("baseOutputDirectory"), "baseOutputDirectory"),
    "tensorboard without service account": (lambda s: s.pop("serviceAccount"),
                                             "tensorboard needs a serviceAccount"),
    "entry point replaced": (_set(["workerPoolSpecs", 0, "containerSpec", "command"],
                                  ["python", "train.py"]), "command replaces"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CUSTOM_JOBS))
def test_broken_custom_job_is_rejected(case):
    mutate, message = BROKEN_CUSTOM_JOBS[case]
    spec = _rendered("gpu_l4.yaml")
    mutate(spec)

    with pytest.raises(validate.SpecError, match=message):
        validate.validate_spec(spec)


def test_workers_must_train_like_the_chief():
    spec = _rendered("multi_worker.yaml")
    spec["workerPoolSpecs"][1]["containerSpec"]["args"].append("--epochs=3")

    with pytest.raises(validate.SpecError, match=r"workerPoolSpecs\[1\] runs the trainer with"):
        validate.validate_spec(spec)


def test_tpu_vm_needs_the_tpu_flag():
    spec = _rendered("tpu_v5e.yaml")
    _args0(spec).remove("--tpu=local")

    with pytest.raises(validate.SpecError, match="ct5lp-hightpu-4t is a TPU VM; pass --tpu=local"):
        validate.validate_spec(spec)


def test_package_must_run_the_trainer_module():
    spec = _rendered("gpu_l4_package.yaml")
    _pool0(spec)["pythonPackageSpec"]["pythonModule"] = "trainer.train"

    with pytest.raises(validate.SpecError, match="pythonModule must be trainer.task"):
        validate.validate_spec(spec)


def _trial_args(spec):
    return spec["trialJobSpec"]["workerPoolSpecs"][0]["containerSpec"]["args"]


def _parameter(spec, name):
    return next(p for p in spec["studySpec"]["parameters"] if p["parameterId"] == name)


BROKEN_TUNING_JOBS = {
    "metric the trainer does not report": (
        lambda s: _trial_args(s).__setitem__(1, "--hypertune_metric=val_loss"),
        "--hypertune_metric=val_accuracy"),
    "parameter that is no flag": (
        lambda s: _parameter(s, "learning_rate").__setitem__("parameterId", "learning_rat"),
        "learning_rat"),
    "bound the trainer rejects": (
        lambda s: _parameter(s, "dropout")["doubleValueSpec"].__setitem__("maxValue", 1.0),
        "parameter 'dropout'.*--dropout=1.0 must be in"),
    "trials sharing a job_dir": (lambda s: _trial_args(s).append("--job_dir=gs://b/one"),
                                 "--job_dir would put every trial in one folder"),
    "tuned flag also fixed": (lambda s: _trial_args(s).append("--dropout=0.3"),
                              "--dropout is tuned by the study"),
    "unknown study field": (_set(["studySpec", "searchAlgorithm"], "GRID"),
                            'no field named "searchAlgorithm"'),
    "bad goal": (lambda s: s["studySpec"]["metrics"][0].__setitem__("goal", "BIGGER"),
                 "Invalid enum value BIGGER"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TUNING_JOBS))
def test_broken_tuning_job_is_rejected(case):
    mutate, message = BROKEN_TUNING_JOBS[case]
    spec = _rendered("hptune.yaml")
    mutate(spec)

    with pytest.raises(validate.SpecError, match=message):
        validate.validate_spec(spec)


# ------------------------------------------------------------- Placeholders


def test_unknown_placeholder_is_rejected():
    with pytest.raises(validate.SpecError, match=r"Unknown placeholder \{BUKET\}"):
        validate.render({"outputUriPrefix": "gs://{BUKET}/jobs"}, validate.SAMPLE_VALUES)


def test_unquoted_placeholder_is_rejected():
    spec = yaml.safe_load("containerSpec:\n  imageUri: {IMAGE_URI}\n")

    with pytest.raises(validate.SpecError, match='Unquoted placeholder.*"\\{IMAGE_URI\\}"'):
        validate.render(spec, validate.SAMPLE_VALUES)


def test_unset_tensorboard_is_left_out():
    values = {**validate.SAMPLE_VALUES, "TENSORBOARD": ""}

    spec = validate.render(validate.load_spec(_spec_path("gpu_l4.yaml")), values)

    assert "tensorboard" not in spec
    validate.validate_spec(spec)


def test_header_must_give_the_run_command(tmp_path):
    path = tmp_path / "gpu_l4.yaml"
    path.write_text("# A spec.\n# Expect: a model.\nworkerPoolSpecs: []\n")

    with pytest.raises(validate.SpecError, match="python -m deploy.submit deploy/gpu_l4.yaml"):
        validate.load_spec(str(path))


# ------------------------------------------------------------------ Submit


def test_dry_run_of_a_container_spec(tmp_path):
    prepared = submit.prepare(_spec_path("gpu_l4.yaml"), OPTIONS, now=NOW)
    config_path = str(tmp_path / "run-1.yaml")
    submit.write_gcloud_config(prepared, config_path)

    text = submit.dry_run_text(prepared, OPTIONS, config_path)

    request = _json_of(text)
    assert request["parent"] == "projects/my-project/locations/us-central1"
    assert request["customJob"]["displayName"] == "run-1"
    job_spec = request["customJob"]["jobSpec"]
    assert validate.validate_spec(job_spec) == validate.CUSTOM_JOB
    message = validate.parse(prepared.spec, validate.CUSTOM_JOB)
    assert job_spec == json_format.MessageToDict(type(message).pb(message))
    assert job_spec["workerPoolSpecs"][0]["containerSpec"] == {
        "imageUri": OPTIONS.image, "args": ["--data_dir=gs://my-bucket/data"]}
    assert job_spec["baseOutputDirectory"] == {"outputUriPrefix": "gs://my-bucket/jobs/run-1"}
    assert job_spec["serviceAccount"] == "vertex-trainer@my-project.iam.gserviceaccount.com"
    assert "tensorboard" not in job_spec
    assert text.endswith(
        "gcloud ai custom-jobs create \\\n    --project=my-project \\\n"
        "    --region=us-central1 \\\n    --display-name=run-1 \\\n"
        f"    --config={config_path}")
    # The file gcloud reads holds the same, valid CustomJobSpec.
    written = yaml.safe_load(pathlib.Path(config_path).read_text())
    assert written == prepared.spec
    validate.validate_spec(written)


def test_dry_run_of_a_package_spec_from_the_command_line(tmp_path):
    config_path = tmp_path / "pkg.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "deploy.submit", "deploy/gpu_l4_package.yaml",
         "--project=my-project", "--region=europe-west4", "--bucket=my-bucket",
         "--job_name=pkg", "--tensorboard=77", f"--config_out={config_path}", "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    request = _json_of(result.stdout)
    job_spec = request["customJob"]["jobSpec"]
    validate.validate_spec(job_spec)
    package = job_spec["workerPoolSpecs"][0]["pythonPackageSpec"]
    package_uri = "gs://my-bucket/packages/pkg/transfer-trainer.tar.gz"
    assert package["packageUris"] == [package_uri]
    assert package["pythonModule"] == "trainer.task"
    assert job_spec["tensorboard"] == "projects/my-project/locations/europe-west4/tensorboards/77"
    assert f"gcloud storage cp dist/*.tar.gz {package_uri}" in result.stdout
    assert "gcloud ai custom-jobs create" in result.stdout
    assert f"--config={config_path}" in result.stdout
    # gcloud's file and the request are the same CustomJobSpec (JSON writes int64 as strings).
    written = yaml.safe_load(config_path.read_text())
    assert (validate.parse(written, validate.CUSTOM_JOB)
            == validate.parse(job_spec, validate.CUSTOM_JOB))


def test_dry_run_of_the_tuning_spec(tmp_path):
    prepared = submit.prepare(_spec_path("hptune.yaml"), OPTIONS, now=NOW)

    request = json.loads(submit.request_json(prepared))
    command = submit.gcloud_command(prepared, OPTIONS, "/tmp/hp.yaml")

    job = request["hyperparameterTuningJob"]
    assert job["displayName"] == "run-1"
    assert validate.validate_spec(job) == validate.TUNING_JOB
    assert command.startswith("gcloud ai hp-tuning-jobs create")
    assert "--max-trial-count=12" in command and "--parallel-trial-count=3" in command
    assert set(submit.gcloud_config(prepared)) == {"studySpec", "trialJobSpec"}


def test_after_submission_it_says_where_to_look():
    options = submit.Options(**{**OPTIONS.__dict__, "tensorboard": "9"})
    prepared = submit.prepare(_spec_path("gpu_l4.yaml"), options, now=NOW)
    name = "projects/my-project/locations/us-central1/customJobs/123"

    text = submit.submitted_text(prepared, name)

    assert f"Submitted {name}" in text
    assert "/locations/us-central1/training/123?project=my-project" in text
    assert "tensorboard --logdir gs://my-bucket/jobs/run-1" in text
    assert "tensorboards+9+experiments+123" in text  # The Vertex AI TensorBoard link.


def test_default_job_name_and_bucket_forms():
    options = submit.Options(project="p", region="us-central1", bucket="gs://b/", image="i")

    values = submit.placeholder_values("deploy/spot_gpu_l4.yaml", options, now=NOW)

    assert values["JOB_NAME"] == "spot-gpu-l4-20250102-030405"
    assert values["BUCKET"] == "b"
    assert values["DATA_DIR"] == "gs://b/data"
    assert values["TENSORBOARD"] == ""


def test_container_spec_needs_an_image():
    options = submit.Options(project="p", region="us-central1", bucket="b")

    with pytest.raises(validate.SpecError, match="needs --image"):
        submit.prepare(_spec_path("multi_worker.yaml"), options)


def test_sdist_holds_the_trainer_and_the_specs(tmp_path):
    path = submit.build_sdist(str(tmp_path))

    with tarfile.open(path) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"setup.py", "trainer/task.py", "trainer/config.py", "deploy/submit.py",
            "deploy/gpu_l4.yaml", "deploy/serve.py", "deploy/serving/model_tf_cpu.yaml"} <= names
    assert not any(name.startswith(("tests/", "job/", "runs/", ".git/")) for name in names)


# ------------------------------------------------------ Hypertune reporting


@pytest.fixture
def metric_file(tmp_path, monkeypatch):
    """Where a new cloudml-hypertune client writes (it reads its own variable)."""
    path = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
    return path


def _reports(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hypertune_reporter_reports_each_epoch_of_both_phases(metric_file):
    client = hypertune.HyperTune()
    # train.py makes one callback per phase; the shared client keeps both phases' reports.
    phase1 = callbacks.HypertuneReporter("val_accuracy", enabled=True, client=client)
    phase2 = callbacks.HypertuneReporter("val_accuracy", enabled=True, client=client)

    phase1.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.5})
    phase2.on_epoch_end(1, {"loss": 0.8, "val_accuracy": 0.75})

    assert [(r["val_accuracy"], r["global_step"]) for r in _reports(metric_file)] == [
        ("0.5", "1"), ("0.75", "2")]


def test_hypertune_reporter_is_a_no_op_when_disabled(metric_file):
    client = hypertune.HyperTune()

    callbacks.HypertuneReporter("val_accuracy", enabled=False, client=client).on_epoch_end(
        0, {"val_accuracy": 1.0})
    callbacks.HypertuneReporter("", enabled=True, client=client).on_epoch_end(
        0, {"val_accuracy": 1.0})

    assert not metric_file.exists()


def test_hypertune_reporter_stops_on_a_missing_metric(metric_file):
    reporter = callbacks.HypertuneReporter("val_acc", enabled=True, client=hypertune.HyperTune())

    with pytest.raises(KeyError, match="val_acc.*'val_accuracy'"):
        reporter.on_epoch_end(0, {"val_accuracy": 0.5})


def test_tuning_spec_metric_is_the_reported_one():
    spec = _rendered("hptune.yaml")
    config = validate.check_trainer_args(_trial_args(spec))

    assert config.hypertune_metric == spec["studySpec"]["metrics"][0]["metricId"]
