"""Vertex AI serving requests: every deploy/serving/*.yaml, built into the real
google.cloud.aiplatform_v1 requests (model upload, endpoint creation, model
deployment, batch prediction), the offline checks on broken ones, the dry run
of `python -m deploy.serve`, and sending through the real API clients.

Nothing here talks to Google Cloud: the clients send to a gRPC server on
localhost that decodes and answers the real Vertex AI messages (LocalVertex).
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
from google.cloud import aiplatform_v1
from google.protobuf import json_format

from deploy import serve
from deploy import serving_specs

REPO = os.path.dirname(serving_specs.validate.DEPLOY_DIR)
SPECS = serving_specs.spec_paths()
OPTIONS = serving_specs.Options(
    project="my-project", region="europe-west4",
    model_dir="gs://my-bucket/jobs/gpu-l4-20250102-030405/model/",
    display_name="gpu-l4-20250102-030405", model="gpu-l4-20250102-030405",
    input_uris=("gs://my-bucket/batch/images.txt",), output_uri="gs://my-bucket/batch/out")
PARENT = "projects/my-project/locations/europe-west4"


def _spec(name):
    return os.path.join(serving_specs.SERVING_DIR, name)


def _loaded(name):
    return copy.deepcopy(serving_specs.load_spec(_spec(name)))


# ------------------------------------------------------- Every spec is valid


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_serving_spec_is_valid(path):
    kind = serving_specs.validate_file(path)

    prefix = os.path.basename(path).split("_")[0]
    assert kind == {"model": "upload", "endpoint": "deploy", "batch": "batch"}[prefix]


def test_specs_cover_cpu_and_gpu_serving_and_both_batch_inputs():
    requests = [serving_specs.sample_request(path) for path in SPECS]
    images = {r.model.container_spec.image_uri for r in requests
              if isinstance(r, aiplatform_v1.UploadModelRequest)}
    machines = {(r.deployed_model.dedicated_resources.machine_spec.machine_type,
                 r.deployed_model.dedicated_resources.machine_spec.accelerator_type.name)
                for r in requests if isinstance(r, aiplatform_v1.DeployModelRequest)}
    formats = {r.batch_prediction_job.input_config.instances_format for r in requests
               if isinstance(r, aiplatform_v1.CreateBatchPredictionJobRequest)}

    assert images == {"us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest",
                      "us-docker.pkg.dev/vertex-ai/prediction/tf2-gpu.2-15:latest"}
    assert machines == {("n1-standard-4", "ACCELERATOR_TYPE_UNSPECIFIED"),
                        ("n1-standard-8", "NVIDIA_TESLA_T4")}
    assert formats == {"file-list", "jsonl"}


def test_validate_command_reports_every_spec(capsys):
    assert serve._validate_all() == 0
    out = capsys.readouterr().out
    assert all(f"{path}: ok" in out for path in SPECS), out


# ------------------------------------------------------------ The requests


def test_upload_request_registers_the_model_folder_with_the_prebuilt_container():
    request, = serve.build_requests("upload", _spec("model_tf_cpu.yaml"), OPTIONS)

    assert isinstance(request, aiplatform_v1.UploadModelRequest)
    assert request.parent == PARENT
    assert request.model_id == "gpu-l4-20250102-030405"
    assert request.model.display_name == "gpu-l4-20250102-030405"
    assert request.model.artifact_uri == "gs://my-bucket/jobs/gpu-l4-20250102-030405/model"
    assert request.model.container_spec.image_uri == (
        "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest")


def test_deploy_creates_an_endpoint_named_like_the_model_then_deploys_to_it():
    create, deploy = serve.build_requests("deploy", _spec("endpoint_gpu_t4.yaml"), OPTIONS)

    assert isinstance(create, aiplatform_v1.CreateEndpointRequest)
    assert (create.parent, create.endpoint_id, create.endpoint.display_name) == (
        PARENT, "gpu-l4-20250102-030405", "gpu-l4-20250102-030405")
    assert isinstance(deploy, aiplatform_v1.DeployModelRequest)
    assert deploy.endpoint == f"{PARENT}/endpoints/gpu-l4-20250102-030405"
    assert deploy.deployed_model.model == f"{PARENT}/models/gpu-l4-20250102-030405"
    resources = deploy.deployed_model.dedicated_resources
    assert (resources.machine_spec.machine_type, resources.machine_spec.accelerator_type,
            resources.machine_spec.accelerator_count) == (
        "n1-standard-8", aiplatform_v1.AcceleratorType.NVIDIA_TESLA_T4, 1)
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 2)
    assert dict(deploy.traffic_split) == {"0": 100}


def test_deploy_to_an_existing_endpoint_sends_one_request():
    options = dataclasses.replace(OPTIONS, endpoint="789",
                                  model="projects/other/locations/europe-west4/models/5")
    deploy, = serve.build_requests("deploy", _spec("endpoint_cpu.yaml"), options)

    assert deploy.endpoint == f"{PARENT}/endpoints/789"
    assert deploy.deployed_model.model == "projects/other/locations/europe-west4/models/5"


@pytest.mark.parametrize("spec, key_field", [("batch_file_list.yaml", ""),
                                             ("batch_jsonl.yaml", "key")])
def test_batch_request_reads_gcs_and_writes_gcs(spec, key_field):
    request, = serve.build_requests("batch", _spec(spec), OPTIONS)

    assert isinstance(request, aiplatform_v1.CreateBatchPredictionJobRequest)
    job = request.batch_prediction_job
    assert request.parent == PARENT
    assert job.model == f"{PARENT}/models/gpu-l4-20250102-030405"
    assert list(job.input_config.gcs_source.uris) == ["gs://my-bucket/batch/images.txt"]
    assert job.output_config.gcs_destination.output_uri_prefix == "gs://my-bucket/batch/out"
    assert job.output_config.predictions_format == "jsonl"
    assert job.instance_config.key_field == key_field
    assert job.dedicated_resources.starting_replica_count >= 1


def test_dry_run_prints_the_exact_requests_in_order(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deploy.serve", "deploy", "deploy/serving/endpoint_cpu.yaml",
         "--project=my-project", "--region=europe-west4", "--model=m1",
         "--display_name=Cats vs Dogs", "--service_account=sa@my-project.iam.gserviceaccount.com",
         "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr

    blocks = result.stdout.split("# 2. ")
    assert blocks[0].startswith("# 1. CreateEndpointRequest that deploy.serve would send:")
    assert blocks[1].startswith("DeployModelRequest that deploy.serve would send:")
    create = json_format.Parse(blocks[0][blocks[0].index("{"):],
                               aiplatform_v1.CreateEndpointRequest.pb()())
    deploy = json_format.Parse(blocks[1][blocks[1].index("{"):],
                               aiplatform_v1.DeployModelRequest.pb()())
    assert create.endpoint_id == "cats-vs-dogs"
    assert deploy.endpoint == f"{PARENT}/endpoints/cats-vs-dogs"
    assert deploy.deployed_model.model == f"{PARENT}/models/m1"
    assert deploy.deployed_model.service_account == "sa@my-project.iam.gserviceaccount.com"
    assert deploy.deployed_model.dedicated_resources.machine_spec.machine_type == "n1-standard-4"


# --------------------------------------------------- Broken specs are rejected


def _set(path, value):
    def mutate(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


BROKEN = {
    "unknown field": ("endpoint_cpu.yaml", _set(["deployedModel", "dedicatedResources",
                                                 "minReplicas"], 1), 'no field named "minReplicas"'),
    "bad accelerator enum": ("endpoint_gpu_t4.yaml",
                             _set(["deployedModel", "dedicatedResources", "machineSpec",
                                   "acceleratorType"], "NVIDIA_T4"), "Invalid enum value NVIDIA_T4"),
    "GPU the machine cannot take": (
        "endpoint_gpu_t4.yaml", _set(["deployedModel", "dedicatedResources", "machineSpec",
                                      "machineType"], "g2-standard-8"),
        "g2-standard-8 cannot take NVIDIA_TESLA_T4 x 1"),
    "no replicas": ("endpoint_cpu.yaml", _set(["deployedModel", "dedicatedResources",
                                               "minReplicaCount"], 0),
                    "minReplicaCount must be at least 1"),
    "max below min": ("endpoint_cpu.yaml", _set(["deployedModel", "dedicatedResources",
                                                 "minReplicaCount"], 4),
                      r"maxReplicaCount \(3\) is below minReplicaCount \(4\)"),
    "traffic not 100": ("endpoint_cpu.yaml", _set(["trafficSplit"], {"0": 90}),
                        "must add up to 100"),
    "traffic without the new model": ("endpoint_cpu.yaml", _set(["trafficSplit"], {"77": 100}),
                                      'must name "0"'),
    "no dedicated machines": ("endpoint_cpu.yaml", _set(["deployedModel"], {
        "automaticResources": {"minReplicaCount": 1}}), "dedicatedResources is required"),
    "custom image": ("model_tf_cpu.yaml", _set(["model", "containerSpec", "imageUri"],
                                               "gcr.io/me/server:1"),
                     "not a prebuilt TensorFlow prediction image"),
    "pinned tag": ("model_tf_cpu.yaml", _set(
        ["model", "containerSpec", "imageUri"],
        "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:20240101"), "'latest' tag"),
    "unchecked TF version": ("model_tf_cpu.yaml", _set(
        ["model", "containerSpec", "imageUri"],
        "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-8:latest"),
        "TensorFlow 2.8 serving is not checked"),
    "route override": ("model_tf_cpu.yaml", _set(["model", "containerSpec", "predictRoute"],
                                                 "/predict"), "defines its own server"),
    "csv batch input": ("batch_file_list.yaml", _set(["inputConfig", "instancesFormat"], "csv"),
                        "instancesFormat must be one of"),
    "key field on a file list": ("batch_file_list.yaml", _set(["instanceConfig"],
                                                              {"keyField": "key"}),
                                 "keyField applies to JSON Lines"),
    "batch output not jsonl": ("batch_jsonl.yaml", _set(["outputConfig", "predictionsFormat"],
                                                        "csv"), "predictionsFormat must be jsonl"),
    "batch starting above max": ("batch_jsonl.yaml", _set(["dedicatedResources",
                                                           "startingReplicaCount"], 5),
                                 r"maxReplicaCount \(4\) is below startingReplicaCount \(5\)"),
    "snake_case key": ("batch_jsonl.yaml", lambda s: s.__setitem__(
        "output_config", s.pop("outputConfig")), "must be camelCase"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_serving_spec_is_rejected(case, tmp_path):
    name, mutate, message = BROKEN[case]
    spec = _loaded(name)
    mutate(spec)
    with open(_spec(name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    path = tmp_path / name
    path.write_text(header + serving_specs.yaml.safe_dump(spec))

    with pytest.raises(serving_specs.SpecError, match=message):
        serving_specs.sample_request(str(path))


def test_header_must_give_the_serve_command(tmp_path):
    path = tmp_path / "endpoint_cpu.yaml"
    path.write_text("# A spec without its run command.\n# Expect: nothing.\n"
                    + serving_specs.yaml.safe_dump(_loaded("endpoint_cpu.yaml")))

    with pytest.raises(serving_specs.SpecError,
                       match="python -m deploy.serve deploy deploy/serving/endpoint_cpu.yaml"):
        serving_specs.load_spec(str(path))


@pytest.mark.parametrize("options, message", [
    (dataclasses.replace(OPTIONS, model_dir="/home/me/job/model"), "artifactUri.*gs://"),
    (dataclasses.replace(OPTIONS, display_name=""), "needs --display_name"),
])
def test_upload_needs_a_gcs_model_and_a_name(options, message):
    with pytest.raises(serving_specs.SpecError, match=message):
        serve.build_requests("upload", _spec("model_tf_cpu.yaml"), options)


@pytest.mark.parametrize("command, options, message", [
    ("deploy", dataclasses.replace(OPTIONS, model=""), "needs --model"),
    ("batch", dataclasses.replace(OPTIONS, input_uris=()), "needs --input_uris"),
    ("batch", dataclasses.replace(OPTIONS, input_uris=("images.txt",)), "input.*gs://"),
])
def test_missing_or_local_values_are_named(command, options, message):
    spec = "endpoint_cpu.yaml" if command == "deploy" else "batch_file_list.yaml"
    with pytest.raises(serving_specs.SpecError, match=message):
        serve.build_requests(command, _spec(spec), options)


def test_a_spec_of_another_kind_names_the_right_command():
    with pytest.raises(serving_specs.SpecError, match="run `python -m deploy.serve upload"):
        serve.build_requests("deploy", _spec("model_tf_cpu.yaml"), OPTIONS)


@pytest.mark.parametrize("model_id, ok", [("cats_v2", True), ("2cats", False),
                                           ("Cats", False), ("-cats", False)])
def test_explicit_model_id_follows_vertex_rules(model_id, ok):
    build = lambda: serve.build_requests("upload", _spec("model_tf_cpu.yaml"), OPTIONS,
                                         model_id=model_id)
    if ok:
        assert build()[0].model_id == model_id
    else:
        with pytest.raises(serving_specs.SpecError, match="--model_id"):
            build()


@pytest.mark.parametrize("display_name, endpoint_id", [
    ("gpu-l4-20250102-030405", "gpu-l4-20250102-030405"), ("Cats_vs Dogs!", "cats-vs-dogs"),
    ("2025 run", "m-2025-run")])
def test_ids_from_display_names(display_name, endpoint_id):
    assert serve.resource_id(display_name) == endpoint_id


# ------------------------------------- The model's container suits its machines


def _machine(spec_name):
    request = serving_specs.sample_request(_spec(spec_name))
    return request.deployed_model.dedicated_resources.machine_spec


@pytest.mark.parametrize("image, spec_name, message", [
    ("tf2-cpu", "endpoint_cpu.yaml", None),
    ("tf2-gpu", "endpoint_gpu_t4.yaml", None),
    ("tf2-cpu", "endpoint_gpu_t4.yaml", "CPU-only, so the GPU would sit idle"),
    ("tf2-gpu", "endpoint_cpu.yaml", "is the GPU build"),
])
def test_container_must_fit_the_machine(image, spec_name, message):
    uri = f"europe-docker.pkg.dev/vertex-ai/prediction/{image}.2-15:latest"
    if message is None:
        serving_specs.check_container_fits_machine(uri, _machine(spec_name))
    else:
        with pytest.raises(serving_specs.SpecError, match=message):
            serving_specs.check_container_fits_machine(uri, _machine(spec_name))


def test_request_json_round_trips_through_the_real_type():
    request = serving_specs.sample_request(_spec("batch_jsonl.yaml"))
    parsed = json_format.Parse(serving_specs.request_json(request),
                               aiplatform_v1.CreateBatchPredictionJobRequest.pb()())

    assert parsed == aiplatform_v1.CreateBatchPredictionJobRequest.pb(request)
    assert json.loads(serving_specs.request_json(request))["batchPredictionJob"][
        "instanceConfig"] == {"keyField": "key"}


# ------------------------------------- Sending, to a local server of the real API


class LocalVertex:
    """A gRPC server on localhost that speaks the Vertex AI protos and records requests.

    Long-running methods answer with a finished google.longrunning.Operation
    whose response is the real response message, as Vertex AI does when done.
    """

    def __init__(self, model_image):
        import grpc
        from concurrent import futures

        self.model_image = model_image
        self.received = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers(self._handlers())
        port = self._server.add_insecure_port("localhost:0")
        self._server.start()
        self.channels = []
        self.address = f"localhost:{port}"

    def _handlers(self):
        import grpc
        from google.longrunning import operations_pb2

        def operation(response):
            op = operations_pb2.Operation(name="operations/1", done=True)
            op.response.Pack(type(response).pb(response))
            return op

        def method(request_type, answer):
            def handle(request, context):
                self.received.append(request_type.wrap(request))
                reply = answer(request_type.wrap(request))
                return reply if isinstance(reply, operations_pb2.Operation) else \
                    type(reply).pb(reply)
            return grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=request_type.pb().FromString,
                response_serializer=lambda message: message.SerializeToString())

        v1 = aiplatform_v1
        services = {
            "ModelService": {
                "UploadModel": method(v1.UploadModelRequest, lambda r: operation(
                    v1.UploadModelResponse(model=f"{r.parent}/models/{r.model_id}"))),
                "GetModel": method(v1.GetModelRequest, lambda r: v1.Model(
                    name=r.name, container_spec=v1.ModelContainerSpec(image_uri=self.model_image))),
            },
            "EndpointService": {
                "CreateEndpoint": method(v1.CreateEndpointRequest, lambda r: operation(
                    v1.Endpoint(name=f"{r.parent}/endpoints/{r.endpoint_id}"))),
                "DeployModel": method(v1.DeployModelRequest, lambda r: operation(
                    v1.DeployModelResponse(deployed_model=v1.DeployedModel(id="4242")))),
            },
            "JobService": {
                "CreateBatchPredictionJob": method(
                    v1.CreateBatchPredictionJobRequest, lambda r: v1.BatchPredictionJob(
                        name=f"{r.parent}/batchPredictionJobs/77")),
            },
        }
        return [grpc.method_handlers_generic_handler(f"google.cloud.aiplatform.v1.{name}", table)
                for name, table in services.items()]

    def clients(self):
        import grpc
        from google.cloud.aiplatform_v1.services.endpoint_service import transports as endpoint_t
        from google.cloud.aiplatform_v1.services.job_service import transports as job_t
        from google.cloud.aiplatform_v1.services.model_service import transports as model_t

        def channel():
            self.channels.append(grpc.insecure_channel(self.address))
            return self.channels[-1]

        return serve.Clients(
            aiplatform_v1.ModelServiceClient(transport=model_t.ModelServiceGrpcTransport(
                channel=channel())),
            aiplatform_v1.EndpointServiceClient(transport=endpoint_t.EndpointServiceGrpcTransport(
                channel=channel())),
            aiplatform_v1.JobServiceClient(transport=job_t.JobServiceGrpcTransport(
                channel=channel())))

    def stop(self):
        for channel in self.channels:
            channel.close()
        self._server.stop(None)


@pytest.fixture
def vertex(request):
    """A LocalVertex whose uploaded model has the image given by the test's parameter."""
    server = LocalVertex(getattr(request, "param",
                                 "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"))
    yield server
    server.stop()


def test_upload_is_sent_as_built(vertex):
    requests = serve.build_requests("upload", _spec("model_tf_cpu.yaml"), OPTIONS)

    lines = serve.send(requests, vertex.clients())

    assert vertex.received == requests
    assert lines == [f"Uploaded {PARENT}/models/gpu-l4-20250102-030405"]


def test_deploy_checks_the_model_then_creates_the_endpoint_and_deploys(vertex):
    requests = serve.build_requests("deploy", _spec("endpoint_cpu.yaml"), OPTIONS)

    lines = serve.send(requests, vertex.clients())

    assert [type(r).__name__ for r in vertex.received] == [
        "GetModelRequest", "CreateEndpointRequest", "DeployModelRequest"]
    assert vertex.received[0].name == f"{PARENT}/models/gpu-l4-20250102-030405"
    assert vertex.received[1:] == requests
    assert lines == [f"Created endpoint {PARENT}/endpoints/gpu-l4-20250102-030405",
                     f"Deployed {PARENT}/models/gpu-l4-20250102-030405 as 4242 to "
                     f"{PARENT}/endpoints/gpu-l4-20250102-030405"]


def test_batch_job_is_created(vertex):
    requests = serve.build_requests("batch", _spec("batch_file_list.yaml"), OPTIONS)

    lines = serve.send(requests, vertex.clients())

    assert vertex.received[1:] == requests
    assert lines[0] == f"Created {PARENT}/batchPredictionJobs/77"


@pytest.mark.parametrize("vertex", ["us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"],
                         indirect=True)
def test_a_cpu_model_on_a_gpu_endpoint_is_refused_before_anything_is_created(vertex):
    requests = serve.build_requests("deploy", _spec("endpoint_gpu_t4.yaml"), OPTIONS)

    with pytest.raises(serving_specs.SpecError, match="CPU-only, so the GPU would sit idle"):
        serve.send(requests, vertex.clients())
    assert [type(r).__name__ for r in vertex.received] == ["GetModelRequest"]


# ------------------------------------------- Upload names the served version


def test_upload_resolves_a_job_model_folder_to_its_newest_complete_version(tmp_path):
    """A job's model/ holds numbered versions (trainer/export.py); the upload must
    name the newest complete one, never the folder itself or a half-written one."""
    model = tmp_path / "model"
    for version, complete in ((1, True), (2, True), (3, False)):
        (model / str(version) / "variables").mkdir(parents=True)
        if complete:
            (model / str(version) / "saved_model.pb").write_bytes(b"pb")
    assert serve.served_version(str(model)) == f"{model}/2"
    assert serve.served_version(f"{model}/1") == f"{model}/1"
    with pytest.raises(serve.app.UsageError, match="No exported model at .*empty"):
        serve.served_version(str(tmp_path / "empty"))
