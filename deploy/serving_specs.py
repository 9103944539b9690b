"""The serving specs in deploy/serving/ and the Vertex AI requests built from them.

A serving spec holds how a model is served, and the command line says what:

* ``model_*.yaml`` is an ``UploadModelRequest`` without its parent: the
  prediction container. ``deploy.serve upload`` adds the model folder
  (``artifactUri``) and a display name.
* ``endpoint_*.yaml`` is a ``DeployModelRequest`` without its endpoint: the
  machines (machine type, optional GPU, min/max replicas) and the traffic
  split. ``deploy.serve deploy`` adds the model and the endpoint, creating
  the endpoint when none is given.
* ``batch_*.yaml`` is a ``BatchPredictionJob``: the input format (a file list
  of images, or JSON Lines of instances), the output format and the machines.
  ``deploy.serve batch`` adds the model, the gs:// inputs and the gs:// output
  folder.

Each spec is parsed into the real ``google.cloud.aiplatform_v1`` type (unknown
fields and enum values are errors), and each built request passes the checks
below, offline, as ``deploy.validate`` checks the job specs:

* the container is a prebuilt TensorFlow prediction image at a version known
  to load what the trainer exports (``CHECKED_SERVING_VERSIONS``), with the
  ``latest`` tag Vertex AI requires, and no command or route overrides;
* the model folder and every input and output are gs:// URIs;
* dedicated machines whose accelerator fits the machine type, at least one
  replica and max >= min; a traffic split of whole percents summing to 100;
* batch input ``file-list`` or ``jsonl``, output ``jsonl``, and a
  ``keyField`` only with JSON Lines (Vertex AI applies it to no other input).
"""

import dataclasses
import glob
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import yaml

from deploy import validate

SERVING_DIR = os.path.join(validate.DEPLOY_DIR, "serving")

UPLOAD = "upload"
DEPLOY = "deploy"
BATCH = "batch"

# [region]-docker.pkg.dev/vertex-ai/prediction/tf2-[cpu|gpu].[version]:latest
PREBUILT_TF_IMAGE = re.compile(
    r"(?P<region>us|europe|asia)-docker\.pkg\.dev/vertex-ai/prediction/"
    r"tf2-(?P<accelerator>cpu|gpu)\.(?P<version>\d+-\d+):(?P<tag>[\w.-]+)")
# Serving runtimes that loaded and ran a model exported by this trainer
# (TensorFlow 2.21), with the same predictions: benchmarks/results/serving_container.md.
CHECKED_SERVING_VERSIONS = ("2-15",)
BATCH_INSTANCE_FORMATS = ("file-list", "jsonl")


# Every check here raises a SpecError (some come from deploy.validate's shared checks).
SpecError = validate.SpecError


class ServingSpecError(SpecError):
    """A serving spec or request that Vertex AI would reject or serve wrongly."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line adds to a serving spec."""

    project: str
    region: str
    model_dir: str = ""  # upload: the exported SavedModel folder.
    display_name: str = ""
    model: str = ""  # deploy, batch: a model ID or resource name.
    endpoint: str = ""  # deploy: an endpoint ID or resource name; empty: create one.
    input_uris: tuple = ()  # batch: gs:// file lists or JSON Lines files.
    output_uri: str = ""  # batch: gs:// folder for the predictions.
    service_account: str = ""  # deploy, batch: the account the containers run as.

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"


# What the offline checks fill in.
SAMPLE_OPTIONS = Options(
    project="example-project", region="us-central1",
    model_dir="gs://example-bucket/jobs/example-job/model", display_name="example-model",
    model="123", endpoint="456", input_uris=("gs://example-bucket/batch/images.txt",),
    output_uri="gs://example-bucket/batch/predictions")


# ------------------------------------------------------------------ Loading


def spec_paths(serving_dir: str = SERVING_DIR) -> List[str]:
    """Every serving spec, sorted."""
    return sorted(glob.glob(os.path.join(serving_dir, "*.yaml")))


def spec_kind(spec: Mapping[str, Any], where: str = "spec") -> str:
    """UPLOAD, DEPLOY or BATCH, from the spec's top-level fields."""
    if "model" in spec and "deployedModel" not in spec:
        return UPLOAD
    if "deployedModel" in spec:
        return DEPLOY
    if "inputConfig" in spec:
        return BATCH
    raise ServingSpecError(f"{where}: a serving spec has `model` (upload), `deployedModel` "
                           "(deploy) or `inputConfig` (batch prediction).")


def load_spec(path: str) -> Dict[str, Any]:
    """Reads a serving spec; its header must give its run command and what to expect."""
    with open(path) as f:
        text = f.read()
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise ServingSpecError(f"{path}: not a YAML mapping.")
    kind = spec_kind(spec, path)
    validate.check_header(text, path, command=(
        f"python -m deploy.serve {kind} deploy/serving/{os.path.basename(path)}"))
    validate.check_camel_case(spec, path)
    return spec


def _parse(spec: Mapping[str, Any], message_type, where: str):
    return validate.parse_message(spec, message_type, where, error=ServingSpecError)


# ------------------------------------------------------- Resource names


def model_artifact_uri(model_dir: str) -> str:
    """The folder the prediction container loads: the exported SavedModel itself
    (``deploy.serve upload`` has already resolved a job's ``model/`` folder to
    its newest complete version, ``served_version``).
    """
    return model_dir.rstrip("/")


def resource_name(value: str, collection: str, options: Options) -> str:
    """A full resource name from an ID (or the name itself)."""
    if not value or "/" in value:
        return value
    return f"{options.parent}/{collection}/{value}"


# -------------------------------------------------------------- Requests


def upload_request(spec: Mapping[str, Any], options: Options, where: str = "spec"):
    """The aiplatform_v1.UploadModelRequest of a model spec, checked."""
    from google.cloud import aiplatform_v1

    request = _parse(spec, aiplatform_v1.UploadModelRequest, where)
    request.parent = options.parent
    request.model.artifact_uri = model_artifact_uri(options.model_dir)
    request.model.display_name = options.display_name
    check_upload(request, where)
    return request


def create_endpoint_request(options: Options):
    """The aiplatform_v1.CreateEndpointRequest for a new endpoint named like the model."""
    from google.cloud import aiplatform_v1

    if not options.display_name:
        raise ServingSpecError("A new endpoint needs a display name (--display_name).")
    return aiplatform_v1.CreateEndpointRequest(
        parent=options.parent, endpoint=aiplatform_v1.Endpoint(display_name=options.display_name))


def deploy_request(spec: Mapping[str, Any], options: Options, endpoint: str,
                   where: str = "spec"):
    """The aiplatform_v1.DeployModelRequest of an endpoint spec, checked.

    Args:
      spec: the endpoint spec.
      options: the command line's values.
      endpoint: the endpoint's resource name (or, in a dry run without one,
        the name it will get).
      where: a name for messages.
    """
    from google.cloud import aiplatform_v1

    request = _parse(spec, aiplatform_v1.DeployModelRequest, where)
    request.endpoint = endpoint
    request.deployed_model.model = resource_name(options.model, "models", options)
    request.deployed_model.display_name = options.display_name
    if options.service_account:
        request.deployed_model.service_account = options.service_account
    check_deploy(request, where)
    return request


def batch_request(spec: Mapping[str, Any], options: Options, where: str = "spec"):
    """The aiplatform_v1.CreateBatchPredictionJobRequest of a batch spec, checked."""
    from google.cloud import aiplatform_v1

    job = _parse(spec, aiplatform_v1.BatchPredictionJob, where)
    job.display_name = options.display_name
    job.model = resource_name(options.model, "models", options)
    job.input_config.gcs_source.uris = list(options.input_uris)
    job.output_config.gcs_destination.output_uri_prefix = options.output_uri
    if options.service_account:
        job.service_account = options.service_account
    request = aiplatform_v1.CreateBatchPredictionJobRequest(
        parent=options.parent, batch_prediction_job=job)
    check_batch(request, where)
    return request


def sample_request(path: str, options: Optional[Options] = None):
    """The request a spec file gives with sample (or the given) options."""
    options = options or SAMPLE_OPTIONS
    spec = load_spec(path)
    kind = spec_kind(spec, path)
    if kind == UPLOAD:
        return upload_request(spec, options, path)
    if kind == DEPLOY:
        return deploy_request(spec, options, resource_name(options.endpoint, "endpoints",
                                                           options), path)
    return batch_request(spec, options, path)


def validate_file(path: str) -> str:
    """Loads a serving spec and checks the request it builds; returns its kind."""
    sample_request(path)
    return spec_kind(load_spec(path), path)


# ---------------------------------------------------------------- Checks


def check_upload(request, where: str = "spec") -> None:
    """Our rules for an aiplatform_v1.UploadModelRequest."""
    model = request.model
    if not model.display_name:
        raise ServingSpecError(f"{where}: the model needs a display name (--display_name).")
    _check_gcs_uri(model.artifact_uri, f"{where}: model.artifactUri (--model_dir)")
    container = model.container_spec
    check_container_image(container.image_uri, f"{where}: model.containerSpec.imageUri")
    overridden = [name for name in ("command", "args", "predict_route", "health_route")
                  if getattr(container, name)]
    if overridden:
        raise ServingSpecError(f"{where}: model.containerSpec sets {overridden}; the prebuilt "
                               "TensorFlow container defines its own server and routes.")


def check_container_image(image_uri: str, where: str = "imageUri") -> re.Match:
    """A prebuilt TensorFlow prediction image known to load the trainer's exports."""
    match = PREBUILT_TF_IMAGE.fullmatch(image_uri or "")
    if not match:
        raise ServingSpecError(
            f"{where}: {image_uri!r} is not a prebuilt TensorFlow prediction image "
            "(us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest, or tf2-gpu).")
    if match["tag"] != "latest":
        raise ServingSpecError(f"{where}: Vertex AI supports prebuilt images only with the "
                               f"'latest' tag; got {match['tag']!r}.")
    if match["version"] not in CHECKED_SERVING_VERSIONS:
        raise ServingSpecError(
            f"{where}: TensorFlow {match['version'].replace('-', '.')} serving is not checked "
            f"to load models exported with TensorFlow 2.21; use "
            f"{' or '.join(CHECKED_SERVING_VERSIONS)} (benchmarks/results/serving_container.md).")
    return match


def check_container_fits_machine(image_uri: str, machine_spec, where: str = "spec") -> None:
    """A GPU image on a machine with a GPU, a CPU image on one without."""
    match = check_container_image(image_uri, f"{where}: the model's image")
    has_gpu = machine_spec.accelerator_count > 0
    if has_gpu and match["accelerator"] == "cpu":
        raise ServingSpecError(f"{where}: the model's image {image_uri} is CPU-only, so the "
                               "GPU would sit idle; upload it with a tf2-gpu spec "
                               "(deploy/serving/model_tf_gpu.yaml) or deploy without a GPU.")
    if not has_gpu and match["accelerator"] == "gpu":
        raise ServingSpecError(f"{where}: the model's image {image_uri} is the GPU build; "
                               "give the machine an accelerator or upload with "
                               "deploy/serving/model_tf_cpu.yaml.")


def check_deploy(request, where: str = "spec") -> None:
    """Our rules for an aiplatform_v1.DeployModelRequest."""
    deployed = request.deployed_model
    if not request.endpoint:
        raise ServingSpecError(f"{where}: the endpoint is required (--endpoint).")
    if not deployed.model:
        raise ServingSpecError(f"{where}: the model is required (--model, an ID or resource "
                               "name that `deploy.serve upload` printed).")
    if "dedicated_resources" not in deployed:
        raise ServingSpecError(f"{where}: deployedModel.dedicatedResources is required; "
                               "custom-trained models are served on dedicated machines.")
    resources = deployed.dedicated_resources
    validate.check_machine(resources.machine_spec,
                           f"{where}: deployedModel.dedicatedResources.machineSpec")
    _check_replicas(resources.min_replica_count, resources.max_replica_count,
                    f"{where}: deployedModel.dedicatedResources", "minReplicaCount")
    _check_traffic_split(dict(request.traffic_split), f"{where}: trafficSplit")


def check_batch(request, where: str = "spec") -> None:
    """Our rules for an aiplatform_v1.CreateBatchPredictionJobRequest."""
    job = request.batch_prediction_job
    if not job.display_name:
        raise ServingSpecError(f"{where}: the job needs a display name (--display_name).")
    if not job.model:
        raise ServingSpecError(f"{where}: the model is required (--model).")
    formats = job.input_config.instances_format
    if formats not in BATCH_INSTANCE_FORMATS:
        raise ServingSpecError(f"{where}: inputConfig.instancesFormat must be one of "
                               f"{list(BATCH_INSTANCE_FORMATS)}; got {formats!r}.")
    uris = list(job.input_config.gcs_source.uris)
    if not uris:
        raise ServingSpecError(f"{where}: inputConfig.gcsSource.uris is empty (--input_uris).")
    for uri in uris:
        _check_gcs_uri(uri, f"{where}: input (--input_uris)")
    _check_gcs_uri(job.output_config.gcs_destination.output_uri_prefix,
                   f"{where}: outputConfig.gcsDestination.outputUriPrefix (--output_uri)")
    if job.output_config.predictions_format != "jsonl":
        raise ServingSpecError(f"{where}: outputConfig.predictionsFormat must be jsonl.")
    if job.instance_config.key_field and formats != "jsonl":
        raise ServingSpecError(f"{where}: instanceConfig.keyField applies to JSON Lines "
                               f"objects only, not to {formats}.")
    if "dedicated_resources" not in job:
        raise ServingSpecError(f"{where}: dedicatedResources is required for a custom-trained "
                               "model.")
    resources = job.dedicated_resources
    validate.check_machine(resources.machine_spec, f"{where}: dedicatedResources.machineSpec")
    _check_replicas(resources.starting_replica_count, resources.max_replica_count,
                    f"{where}: dedicatedResources", "startingReplicaCount")


def _check_gcs_uri(uri: str, where: str) -> None:
    if not uri.startswith("gs://") or len(uri) <= len("gs://"):
        raise ServingSpecError(f"{where} must be a gs:// URI; got {uri!r}.")


def _check_replicas(minimum: int, maximum: int, where: str, min_name: str) -> None:
    if minimum < 1:
        raise ServingSpecError(f"{where}.{min_name} must be at least 1; got {minimum}.")
    if maximum and maximum < minimum:
        raise ServingSpecError(f"{where}.maxReplicaCount ({maximum}) is below "
                               f"{min_name} ({minimum}).")


def _check_traffic_split(split: Dict[str, int], where: str) -> None:
    if not split:
        raise ServingSpecError(f"{where} is required: {{\"0\": 100}} sends all traffic to the "
                               "model being deployed.")
    if any(not 0 <= percent <= 100 for percent in split.values()):
        raise ServingSpecError(f"{where}: each share must be 0-100 percent; got {split}.")
    if sum(split.values()) != 100:
        raise ServingSpecError(f"{where}: the shares must add up to 100; got {split} "
                               f"({sum(split.values())}).")
    if "0" not in split:
        raise ServingSpecError(f"{where} must name \"0\", the model being deployed (other "
                               "keys are IDs of models already on the endpoint).")


def request_json(request) -> str:
    """A request in the proto3 JSON mapping (what the REST API takes)."""
    from google.protobuf import json_format

    return json_format.MessageToJson(type(request).pb(request), indent=2)
