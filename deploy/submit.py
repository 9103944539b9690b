"""Fills in a deploy/ spec and submits it to Vertex AI, or prints the request.

    python -m deploy.submit deploy/gpu_l4.yaml --project=PROJECT \\
        --region=us-central1 --bucket=BUCKET \\
        --image=us-central1-docker.pkg.dev/PROJECT/trainer/trainer:latest [--dry_run]

(also installed as ``vertex-submit``). The spec's placeholders ({BUCKET},
{IMAGE_URI}, ...; see ``deploy/validate.py``) are filled from the flags and
the result passes the same checks ``deploy.validate`` runs offline on every
spec. With ``--dry_run`` it prints the exact request and the equivalent gcloud
command, whose ``--config`` file it writes; nothing is built, uploaded or
submitted. Otherwise a package spec's sdist is built and uploaded to the bucket
first, then the CustomJob or HyperparameterTuningJob is created with
google-cloud-aiplatform, and the console link and TensorBoard command are
printed.
"""

import dataclasses
import datetime
import glob
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional

import yaml
from absl import app
from absl import flags

from deploy import validate

FLAGS = flags.FLAGS

# The service account the docs create; --service_account overrides it.
DEFAULT_SERVICE_ACCOUNT = "vertex-trainer"
# pip installs an sdist whatever its file name; a fixed name keeps the
# package URI known before the sdist is built (and in a dry run).
PACKAGE_FILE = "transfer-trainer.tar.gz"
REPO_ROOT = os.path.dirname(validate.DEPLOY_DIR)


@dataclasses.dataclass(frozen=True)
class Options:
    """Where and how to run: the values the placeholders are filled with."""

    project: str
    region: str
    bucket: str
    image: str = ""
    data_dir: str = ""
    service_account: str = ""
    tensorboard: str = ""
    job_name: str = ""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A filled-in, validated spec and the request that creates its job."""

    kind: str
    spec: Dict[str, Any]  # The filled-in spec, as written in deploy/.
    request: Any  # aiplatform_v1.CreateCustomJobRequest or CreateHyperparameterTuningJobRequest.
    values: Dict[str, str]  # The placeholder values used.

    @property
    def job_name(self) -> str:
        return self.values["JOB_NAME"]

    @property
    def output_dir(self) -> str:
        job_spec = self.spec.get("trialJobSpec", self.spec)
        return job_spec["baseOutputDirectory"]["outputUriPrefix"].rstrip("/")

    @property
    def uses_package(self) -> bool:
        return self.values["PACKAGE_URI"] in yaml.safe_dump(self.spec)


# ------------------------------------------------------------ Preparation


def placeholder_values(spec_path: str, options: Options,
                       now: Optional[datetime.datetime] = None) -> Dict[str, str]:
    """The value of every placeholder for this submission.

    Args:
      spec_path: the spec; its file name starts the default job name.
      options: the flags.
      now: the time that ends the default job name (UTC now when None).

    Returns:
      Placeholder name -> value; "" for an optional one not given.
    """
    bucket = options.bucket.removeprefix("gs://").rstrip("/")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stem = os.path.splitext(os.path.basename(spec_path))[0].replace("_", "-")
    job_name = options.job_name or f"{stem}-{now:%Y%m%d-%H%M%S}"
    return {
        "PROJECT": options.project,
        "REGION": options.region,
        "BUCKET": bucket,
        "IMAGE_URI": options.image,
        # One folder per job: a restarted replica reinstalls what it started with.
        "PACKAGE_URI": f"gs://{bucket}/packages/{job_name}/{PACKAGE_FILE}",
        "DATA_DIR": options.data_dir or f"gs://{bucket}/data",
        "SERVICE_ACCOUNT": options.service_account or (
            f"{DEFAULT_SERVICE_ACCOUNT}@{options.project}.iam.gserviceaccount.com"),
        "JOB_NAME": job_name,
        "TENSORBOARD": _tensorboard_name(options),
    }


def _tensorboard_name(options: Options) -> str:
    """A full resource name from a TensorBoard ID (or the name itself)."""
    if not options.tensorboard or "/" in options.tensorboard:
        return options.tensorboard
    return (f"projects/{options.project}/locations/{options.region}/"
            f"tensorboards/{options.tensorboard}")


def prepare(spec_path: str, options: Options,
            now: Optional[datetime.datetime] = None) -> Prepared:
    """Fills in and validates a spec and builds its create request.

    Raises:
      validate.SpecError: the spec needs a flag that was not given, or fails
        a check.
    """
    spec = validate.load_spec(spec_path)
    values = placeholder_values(spec_path, options, now)
    _require_values(spec, values, spec_path)
    rendered = validate.render(spec, values)
    kind = validate.validate_spec(rendered, where=spec_path)
    return Prepared(kind, rendered, _create_request(rendered, kind, options, values["JOB_NAME"]),
                    values)


# Flags that give a placeholder's value, for the message when one is missing.
_FLAG_OF = {"IMAGE_URI": "--image", "PROJECT": "--project", "REGION": "--region",
            "BUCKET": "--bucket"}


def _require_values(spec: Any, values: Mapping[str, str], spec_path: str) -> None:
    needed = set(validate.PLACEHOLDER.findall(yaml.safe_dump(spec)))
    missing = sorted(name for name in needed - validate.OPTIONAL_PLACEHOLDERS
                     if not values.get(name, "x"))
    if missing:
        flags_needed = ", ".join(_FLAG_OF.get(name, name) for name in missing)
        raise validate.SpecError(f"{spec_path} needs {flags_needed}.")


def _create_request(spec: Dict[str, Any], kind: str, options: Options, job_name: str):
    from google.cloud import aiplatform_v1

    parent = f"projects/{options.project}/locations/{options.region}"
    message = validate.parse(spec, kind)
    if kind == validate.CUSTOM_JOB:
        return aiplatform_v1.CreateCustomJobRequest(
            parent=parent,
            custom_job=aiplatform_v1.CustomJob(display_name=job_name, job_spec=message))
    message.display_name = job_name
    return aiplatform_v1.CreateHyperparameterTuningJobRequest(
        parent=parent, hyperparameter_tuning_job=message)


def request_json(prepared: Prepared) -> str:
    """The request in the proto3 JSON mapping: camelCase, enum names, no defaults."""
    from google.protobuf import json_format

    return json_format.MessageToJson(type(prepared.request).pb(prepared.request), indent=2)


# ---------------------------------------------------------------- Dry run


def gcloud_config(prepared: Prepared) -> Dict[str, Any]:
    """What gcloud's --config takes: the CustomJobSpec, or the study and trial spec."""
    if prepared.kind == validate.CUSTOM_JOB:
        return prepared.spec
    return {key: prepared.spec[key] for key in ("studySpec", "trialJobSpec")}


def gcloud_command(prepared: Prepared, options: Options, config_path: str) -> str:
    """The gcloud command that creates the same job from ``config_path``."""
    if prepared.kind == validate.CUSTOM_JOB:
        parts = ["gcloud ai custom-jobs create"]
        extra = []
    else:
        parts = ["gcloud ai hp-tuning-jobs create"]
        # gcloud takes the trial counts as flags, which override the file.
        extra = [f"--max-trial-count={prepared.spec['maxTrialCount']}",
                 f"--parallel-trial-count={prepared.spec.get('parallelTrialCount', 1)}"]
    parts += [f"--project={shlex.quote(options.project)}",
              f"--region={shlex.quote(options.region)}",
              f"--display-name={shlex.quote(prepared.job_name)}", *extra,
              f"--config={shlex.quote(config_path)}"]
    return " \\\n    ".join(parts)


def dry_run_text(prepared: Prepared, options: Options, config_path: str) -> str:
    """What --dry_run prints: the request, the package step, the gcloud command."""
    lines = [f"# {type(prepared.request).__name__} that deploy.submit would send:",
             request_json(prepared), ""]
    if prepared.uses_package:
        package_uri = prepared.values["PACKAGE_URI"]
        lines += ["# Before submitting, deploy.submit builds the sdist and uploads it to",
                  f"# {package_uri}; with gcloud, do that yourself:",
                  f"python -m build --sdist --outdir dist . && "
                  f"gcloud storage cp dist/*.tar.gz {package_uri}", ""]
    lines += [f"# The same job with gcloud ({config_path} was written by this dry run):",
              gcloud_command(prepared, options, config_path)]
    return "\n".join(lines)


def write_gcloud_config(prepared: Prepared, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(gcloud_config(prepared), f, sort_keys=False)


# ------------------------------------------------------------- Submission


def build_sdist(out_dir: str) -> str:
    """Builds the package's sdist into ``out_dir``; returns its path."""
    if not os.path.exists(os.path.join(REPO_ROOT, "setup.py")):
        raise FileNotFoundError(f"No setup.py in {REPO_ROOT}: package specs are submitted "
                                "from a source checkout.")
    # No isolation: build with the setuptools already installed, no download.
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                    "--outdir", out_dir, REPO_ROOT], check=True, stdout=subprocess.DEVNULL)
    sdists = glob.glob(os.path.join(out_dir, "*.tar.gz"))
    if len(sdists) != 1:
        raise RuntimeError(f"Expected one sdist in {out_dir}, found {sdists}.")
    return sdists[0]


def upload(local_path: str, uri: str, project: str) -> None:
    """Copies a local file to a gs:// URI with google-cloud-storage."""
    from google.cloud import storage

    bucket, _, blob = uri.removeprefix("gs://").partition("/")
    storage.Client(project=project).bucket(bucket).blob(blob).upload_from_filename(local_path)


def create_job(prepared: Prepared, region: str) -> str:
    """Creates the job on Vertex AI; returns its resource name."""
    from google.cloud import aiplatform_v1

    client = aiplatform_v1.JobServiceClient(
        client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
    if prepared.kind == validate.CUSTOM_JOB:
        return client.create_custom_job(request=prepared.request).name
    return client.create_hyperparameter_tuning_job(request=prepared.request).name


def submitted_text(prepared: Prepared, resource_name: str) -> str:
    """Where to watch a submitted job and where its outputs land."""
    from google.cloud.aiplatform.utils import console_utils

    # The console shows both job kinds at .../training/<id>; the SDK's helper
    # builds that link from a customJobs name.
    console = console_utils.custom_job_console_uri(
        resource_name.replace("/hyperparameterTuningJobs/", "/customJobs/"))
    output = prepared.output_dir
    per_trial = "/<trial id>" if prepared.kind == validate.TUNING_JOB else ""
    lines = [f"Submitted {resource_name}",
             f"Console:     {console}",
             f"TensorBoard: tensorboard --logdir {output}",
             f"Outputs:     {output}{per_trial}/model, checkpoints, logs, metrics.json"]
    tensorboard = prepared.values["TENSORBOARD"]
    if tensorboard and prepared.kind == validate.CUSTOM_JOB:
        lines.append("Vertex AI TensorBoard: " + console_utils.custom_job_tensorboard_console_uri(
            tensorboard, resource_name))
    elif tensorboard:
        lines.append(f"Vertex AI TensorBoard: {tensorboard} (one experiment per trial)")
    if prepared.kind == validate.CUSTOM_JOB:
        lines.append(f"Logs:        gcloud ai custom-jobs stream-logs {resource_name}")
    return "\n".join(lines)


# ------------------------------------------------------------ Command line


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the submit command's flags on ``flag_values``."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("project", None, "Google Cloud project ID that runs the job.", **fv)
    flags.DEFINE_string("region", None, "Vertex AI region, e.g. us-central1.", **fv)
    flags.DEFINE_string(
        "bucket", None,
        "Cloud Storage bucket (name or gs://name) for outputs (jobs/<job name>/), "
        "packages and, by default, the data (data/).", **fv)
    flags.DEFINE_string(
        "image", "", "Trainer image URI, for specs with a containerSpec ({IMAGE_URI}).", **fv)
    flags.DEFINE_string(
        "data_dir", "", "--data_dir passed to the trainer; empty: gs://<bucket>/data.", **fv)
    flags.DEFINE_string(
        "service_account", "",
        f"Service account the job runs as; empty: {DEFAULT_SERVICE_ACCOUNT}@<project>."
        "iam.gserviceaccount.com.", **fv)
    flags.DEFINE_string(
        "tensorboard", "",
        "Vertex AI TensorBoard instance (ID or full resource name) to stream the "
        "job's logs/ to; empty: none (read them with tensorboard --logdir).", **fv)
    flags.DEFINE_string(
        "job_name", "",
        "Display name, also the output folder under gs://<bucket>/jobs/; empty: the "
        "spec's file name and the UTC time. Reusing a name resumes that job's outputs.", **fv)
    flags.DEFINE_bool(
        "dry_run", False,
        "Print the request and the equivalent gcloud command (writing its --config "
        "file); build, upload and submit nothing.", **fv)
    flags.DEFINE_string(
        "config_out", "",
        "Where --dry_run writes the gcloud --config file; empty: <tmp>/<job name>.yaml.", **fv)
    flags.mark_flags_as_required(["project", "region", "bucket"], **fv)


def _main(argv):
    if len(argv) != 2:
        raise app.UsageError("Give one spec: python -m deploy.submit deploy/SPEC.yaml "
                             "--project=... --region=... --bucket=...")
    spec_path = argv[1]
    options = Options(project=FLAGS.project, region=FLAGS.region, bucket=FLAGS.bucket,
                      image=FLAGS.image, data_dir=FLAGS.data_dir,
                      service_account=FLAGS.service_account, tensorboard=FLAGS.tensorboard,
                      job_name=FLAGS.job_name)
    try:
        prepared = prepare(spec_path, options)
    except validate.SpecError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.dry_run:
        config_path = FLAGS.config_out or os.path.join(tempfile.gettempdir(),
                                                       f"{prepared.job_name}.yaml")
        write_gcloud_config(prepared, config_path)
        print(dry_run_text(prepared, options, config_path))
        return
    if prepared.uses_package:
        with tempfile.TemporaryDirectory() as out_dir:
            upload(build_sdist(out_dir), prepared.values["PACKAGE_URI"], options.project)
    print(submitted_text(prepared, create_job(prepared, options.region)))


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
