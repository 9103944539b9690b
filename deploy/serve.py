"""From a finished job's model to predictions on Vertex AI, or the requests that would do it.

    python -m deploy.serve upload deploy/serving/model_tf_cpu.yaml --project=P --region=R \\
        --model_dir=gs://BUCKET/jobs/JOB/model --display_name=JOB [--dry_run]
    python -m deploy.serve deploy deploy/serving/endpoint_cpu.yaml --project=P --region=R \\
        --model=JOB --display_name=JOB [--endpoint=ENDPOINT_ID] [--dry_run]
    python -m deploy.serve batch deploy/serving/batch_file_list.yaml --project=P --region=R \\
        --model=JOB --input_uris=gs://BUCKET/batch/images.txt \\
        --output_uri=gs://BUCKET/batch/out --display_name=JOB-batch [--dry_run]
    python -m deploy.serve validate            # every deploy/serving/*.yaml, offline
    python -m deploy.serve request --images=cat.jpg,dog.jpg > body.json
    python -m deploy.serve local --model_dir=job/model --request=body.json
    python -m deploy.serve instances --images='gs://BUCKET/photos/*.jpg' > instances.jsonl

(also installed as ``vertex-serve``). ``upload``, ``deploy`` and ``batch``
build their google.cloud.aiplatform_v1 requests from a serving spec
(``deploy/serving_specs.py``) and the flags, check them offline, and with
``--dry_run`` print them and stop; otherwise they send them. ``request``
prints the JSON body of an online prediction of local or gs:// images,
``local`` runs such a body through an exported model with the rules of the
prediction container (``deploy/prediction_json.py``), and ``instances``
prints the JSON Lines input of a batch prediction with a ``key`` (the image's
path) on every line.
"""

import dataclasses
import json
import re
import sys
from typing import Any, List, Optional

from absl import app
from absl import flags

from deploy import prediction_json
from deploy import serving_specs

FLAGS = flags.FLAGS

COMMANDS = ("upload", "deploy", "batch", "validate", "request", "local", "instances")
# Vertex AI's rule for UploadModelRequest.model_id.
MODEL_ID = re.compile(r"[a-z_][a-z0-9_-]{0,62}")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the serve command's flags on ``flag_values``."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("project", None, "Google Cloud project ID (upload, deploy, batch).", **fv)
    flags.DEFINE_string("region", None, "Vertex AI region, e.g. us-central1; the model, "
                        "endpoint and batch data must be in it.", **fv)
    flags.DEFINE_string("model_dir", "", "upload: the job's exported SavedModel folder, "
                        "gs://BUCKET/jobs/JOB/model. local: the same folder, local or gs://.", **fv)
    flags.DEFINE_string("display_name", "", "Name shown in the console for the model "
                        "(upload), endpoint and deployed model (deploy) or job (batch).", **fv)
    flags.DEFINE_string("model_id", None, "upload: the ID of the new model (a-z, 0-9, _ "
                        "and -); default: the display name in those characters.", **fv)
    flags.DEFINE_string("model", "", "deploy, batch: the model, by ID or resource name.", **fv)
    flags.DEFINE_string("endpoint", "", "deploy: an existing endpoint (ID or resource name); "
                        "empty: create one whose ID is the display name.", **fv)
    flags.DEFINE_list("input_uris", [], "batch: gs:// file lists (one image path a line) or "
                      "JSON Lines files, as the spec's instancesFormat says.", **fv)
    flags.DEFINE_string("output_uri", "", "batch: gs:// folder the predictions go to.", **fv)
    flags.DEFINE_string("service_account", "", "deploy, batch: the service account the "
                        "containers run as; empty: Vertex AI's default.", **fv)
    flags.DEFINE_bool("dry_run", False, "Print the requests; send nothing.", **fv)
    flags.DEFINE_list("images", [], "request, local: image files (local or gs://) to "
                      "predict.", **fv)
    flags.DEFINE_string("request", "", "local: a JSON request body file ({\"instances\": "
                        "[...]}), e.g. from `deploy.serve request`.", **fv)


# -------------------------------------------------------------- Requests


def options_from_flags(flag_values: flags.FlagValues = FLAGS) -> serving_specs.Options:
    return serving_specs.Options(
        project=flag_values.project or "", region=flag_values.region or "",
        model_dir=flag_values.model_dir, display_name=flag_values.display_name,
        model=flag_values.model, endpoint=flag_values.endpoint,
        input_uris=tuple(flag_values.input_uris), output_uri=flag_values.output_uri,
        service_account=flag_values.service_account)


def resource_id(display_name: str, allowed: str = "a-z0-9-") -> str:
    """An ID from a display name: lower case, other characters as '-', starting with a letter."""
    slug = re.sub(f"[^{allowed}]+", "-", display_name.lower()).strip("-_")
    if not slug or not slug[0].isalpha():
        slug = f"m-{slug}".rstrip("-")
    return slug[:63].rstrip("-_")


def build_requests(command: str, spec_path: str, options: serving_specs.Options,
                   model_id: Optional[str] = None) -> List:
    """The requests a command sends, in order, built and checked.

    Args:
      command: upload, deploy or batch.
      spec_path: the serving spec.
      options: the values the flags give.
      model_id: upload: the new model's ID (None: from the display name).

    Raises:
      serving_specs.SpecError: a missing value, or a check failed.
    """
    spec = serving_specs.load_spec(spec_path)
    kind = serving_specs.spec_kind(spec, spec_path)
    if kind != command:
        raise serving_specs.ServingSpecError(
            f"{spec_path} is a {kind} spec; run `python -m deploy.serve {kind} {spec_path}`.")
    _require(options, ("project", "region"))
    if kind == serving_specs.UPLOAD:
        _require(options, ("model_dir", "display_name"))
        request = serving_specs.upload_request(spec, options, spec_path)
        request.model_id = resource_id(options.display_name, "a-z0-9_-") if model_id is None \
            else model_id
        if request.model_id and not MODEL_ID.fullmatch(request.model_id):
            raise serving_specs.ServingSpecError(
                f"--model_id={request.model_id} must be up to 63 of a-z, 0-9, _ and -, "
                "starting with a letter or _.")
        return [request]
    if kind == serving_specs.DEPLOY:
        _require(options, ("model", "display_name"))
        requests = []
        endpoint = serving_specs.resource_name(options.endpoint, "endpoints", options)
        if not endpoint:
            create = serving_specs.create_endpoint_request(options)
            create.endpoint_id = resource_id(options.display_name)
            endpoint = f"{options.parent}/endpoints/{create.endpoint_id}"
            requests.append(create)
        requests.append(serving_specs.deploy_request(spec, options, endpoint, spec_path))
        return requests
    _require(options, ("model", "input_uris", "output_uri", "display_name"))
    return [serving_specs.batch_request(spec, options, spec_path)]


def _require(options: serving_specs.Options, names) -> None:
    missing = [f"--{name}" for name in names if not getattr(options, name)]
    if missing:
        raise serving_specs.ServingSpecError(f"This command needs {', '.join(missing)}.")


def dry_run_text(requests: List) -> str:
    """What --dry_run prints: each request, in the order it would be sent."""
    lines = []
    for i, request in enumerate(requests, start=1):
        lines += [f"# {i}. {type(request).__name__} that deploy.serve would send:",
                  serving_specs.request_json(request), ""]
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------- Sending


@dataclasses.dataclass
class Clients:
    """The Vertex AI API clients the requests go through."""

    model: Any  # aiplatform_v1.ModelServiceClient
    endpoint: Any  # aiplatform_v1.EndpointServiceClient
    job: Any  # aiplatform_v1.JobServiceClient

    @classmethod
    def for_region(cls, region: str) -> "Clients":
        from google.cloud import aiplatform_v1

        options = {"api_endpoint": f"{region}-aiplatform.googleapis.com"}
        return cls(aiplatform_v1.ModelServiceClient(client_options=options),
                   aiplatform_v1.EndpointServiceClient(client_options=options),
                   aiplatform_v1.JobServiceClient(client_options=options))


def _check_model_fits(clients: Clients, model_name: str, machine_spec, where: str) -> None:
    """Online: the uploaded model's container suits the machines it is given."""
    model = clients.model.get_model(name=model_name)
    serving_specs.check_container_fits_machine(model.container_spec.image_uri, machine_spec,
                                               where)


def send(requests: List, clients: Clients) -> List[str]:
    """Sends the requests in order, waiting for each; returns the lines to print.

    Raises:
      serving_specs.SpecError: the uploaded model's container does not suit
        the machines of a deployment or batch job (checked before anything is
        created).
    """
    from google.cloud import aiplatform_v1

    for request in requests:
        if isinstance(request, aiplatform_v1.DeployModelRequest):
            deployed = request.deployed_model
            _check_model_fits(clients, deployed.model, deployed.dedicated_resources.machine_spec,
                              "deploy")
        elif isinstance(request, aiplatform_v1.CreateBatchPredictionJobRequest):
            job = request.batch_prediction_job
            _check_model_fits(clients, job.model, job.dedicated_resources.machine_spec, "batch")
    lines = []
    for request in requests:
        if isinstance(request, aiplatform_v1.UploadModelRequest):
            response = clients.model.upload_model(request=request).result()
            lines.append(f"Uploaded {response.model}")
        elif isinstance(request, aiplatform_v1.CreateEndpointRequest):
            endpoint = clients.endpoint.create_endpoint(request=request).result()
            lines.append(f"Created endpoint {endpoint.name}")
        elif isinstance(request, aiplatform_v1.DeployModelRequest):
            response = clients.endpoint.deploy_model(request=request).result()
            lines.append(f"Deployed {request.deployed_model.model} as "
                         f"{response.deployed_model.id} to {request.endpoint}")
        else:
            job = clients.job.create_batch_prediction_job(request=request)
            output = request.batch_prediction_job.output_config.gcs_destination
            lines += [f"Created {job.name}",
                      f"Outputs: {output.output_uri_prefix}/prediction-<model display name>-"
                      "<time>/"]
    return lines


# ---------------------------------------------------------- Local bodies


def _read_images(patterns: List[str]):
    """(path, bytes) of every image the files, folders or globs name."""
    import tensorflow as tf

    from trainer import predict

    for path in predict.list_images(patterns):
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                yield path, f.read()
        except tf.errors.OpError as e:
            raise app.UsageError(f"--images: cannot read {path}: {e.message}") from None


def request_body(patterns: List[str]) -> dict:
    """The online-prediction body for these images (files, folders or globs; local or gs://)."""
    return {"instances": [prediction_json.image_instance(data)
                          for _, data in _read_images(patterns)]}


def instance_lines(patterns: List[str]):
    """JSON Lines of batch-prediction instances, each keyed by its image's path."""
    for path, data in _read_images(patterns):
        yield json.dumps({"key": path, **prediction_json.image_instance(data)})


def served_version(model_dir: str) -> str:
    """The complete SavedModel under a job's model folder: the newest numbered
    version of trainer/export.py's layout (or the folder itself if it is one).
    It is what the prediction container must load, so the Model's artifactUri."""
    from trainer import export  # TensorFlow is read only by commands that read a model.

    try:
        return export.resolve_model_dir(model_dir)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None


def _local(flag_values) -> str:
    if not flag_values.model_dir:
        raise app.UsageError("local needs --model_dir (the exported model).")
    if bool(flag_values.request) == bool(flag_values.images):
        raise app.UsageError("local needs one of --request=body.json or --images=...")
    if flag_values.request:
        with open(flag_values.request) as f:
            body = json.load(f)
    else:
        body = request_body(flag_values.images)
    import tensorflow as tf

    try:
        response = prediction_json.predict(served_version(flag_values.model_dir), body)
    except prediction_json.RequestError as e:
        raise app.UsageError(f"The container would reject this request (HTTP 400): {e}")
    except tf.errors.InvalidArgumentError as e:
        # TensorFlow's message: "Graph execution error:", the node, then the reason.
        lines = [line.strip() for line in e.message.splitlines()
                 if line.strip() and not line.startswith(("Graph execution", "Detected at",
                                                         "<stack", "\t"))]
        reason = lines[0] if lines else e.message
        raise app.UsageError(f"The model could not run this request: {reason}") from None
    return json.dumps(response, indent=2)


def _validate_all() -> int:
    failed = 0
    for path in serving_specs.spec_paths():
        try:
            print(f"{path}: ok ({serving_specs.validate_file(path)})")
        except (serving_specs.SpecError, OSError) as e:
            failed += 1
            print(f"{path}: FAILED\n    {e}")
    return 1 if failed else 0


# ------------------------------------------------------------ Command line


def _main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Give a command: python -m deploy.serve {{{','.join(COMMANDS)}}} "
                             "...")
    command = argv[1]
    if command == "validate":
        sys.exit(_validate_all())
    if command == "request":
        if not FLAGS.images:
            raise app.UsageError("request needs --images=a.jpg,b.jpg (local or gs://).")
        print(json.dumps(request_body(FLAGS.images)))
        return
    if command == "local":
        print(_local(FLAGS))
        return
    if command == "instances":
        if not FLAGS.images:
            raise app.UsageError("instances needs --images (files, folders or globs).")
        for line in instance_lines(FLAGS.images):
            print(line)
        return
    if len(argv) != 3:
        raise app.UsageError(f"Give one spec: python -m deploy.serve {command} "
                             f"deploy/serving/SPEC.yaml ...")
    options = options_from_flags()
    if command == serving_specs.UPLOAD and options.model_dir:
        options = dataclasses.replace(options, model_dir=served_version(options.model_dir))
    try:
        requests = build_requests(command, argv[2], options, FLAGS.model_id)
    except serving_specs.SpecError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.dry_run:
        print(dry_run_text(requests))
        return
    try:
        lines = send(requests, Clients.for_region(FLAGS.region))
    except serving_specs.SpecError as e:
        raise app.UsageError(str(e)) from None
    print("\n".join(lines))


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
