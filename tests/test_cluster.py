"""Who am I on Vertex AI: TF_CONFIG / CLUSTER_SPEC -> role, writer, strategy, folders.

For every topology in deploy/, each replica gets the environment Vertex AI
documents (CLUSTER_SPEC on every replica, TF_CONFIG only in multi-replica
jobs, AIP_* folders from baseOutputDirectory); the tests check that exactly
one trainer process is the chief, that the strategy is the one the spec is
meant for, and where outputs land. Literal values from Vertex AI's
documentation pin down the parsing itself. Environments are plain dicts:
os.environ is never touched.
"""

import json
import os

import pytest
from absl import flags

from deploy import validate
from trainer import cluster
from trainer import config as config_lib

# The strategy each spec is written for; a new spec needs its line here.
EXPECTED_STRATEGY = {
    "gpu_l4.yaml": "one_device",
    "gpu_l4_package.yaml": "one_device",
    "spot_gpu_l4.yaml": "one_device",
    "hptune.yaml": "one_device",
    "hptune_multilabel.yaml": "one_device",
    "a100x4_mirrored.yaml": "mirrored",
    "multi_worker.yaml": "multi_worker",
    "multi_worker_package.yaml": "multi_worker",
    "multi_worker_reduction_server.yaml": "multi_worker",
    "tpu_v5e.yaml": "tpu",
}
# Vertex AI's pool -> TF_CONFIG task type (its distributed-training docs).
TF_CONFIG_ROLE = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps"}
SPECS = validate.spec_paths()


def _host(pool, index):
    return f"cmle-training-workerpool{pool}-5e1a9b3c2d-{index}:2222"


def vertex_environ(job_spec, pool, index, trial=""):
    """The environment Vertex AI gives replica ``index`` of worker pool ``pool``.

    Args:
      job_spec: a filled-in CustomJobSpec dict.
      pool: the worker pool's position in workerPoolSpecs.
      index: the replica's index in its pool.
      trial: the tuning trial id; "" outside a study.
    """
    hosts = {f"workerpool{i}": [_host(i, k) for k in range(p["replicaCount"])]
             for i, p in enumerate(job_spec["workerPoolSpecs"]) if p}
    task = {"type": f"workerpool{pool}", "index": index, "trial": trial}
    environ = {"CLUSTER_SPEC": json.dumps(
        {"cluster": hosts, "environment": "cloud", "task": task, "job": job_spec})}
    if sum(len(h) for h in hosts.values()) > 1:  # TF_CONFIG: distributed jobs only.
        tf_task = {"type": TF_CONFIG_ROLE[f"workerpool{pool}"], "index": index}
        if trial:
            tf_task["trial"] = trial
        environ["TF_CONFIG"] = json.dumps({
            "cluster": {TF_CONFIG_ROLE[name]: h for name, h in hosts.items()
                        if name in TF_CONFIG_ROLE},
            "task": tf_task, "environment": "cloud", "job": job_spec})
    base = job_spec["baseOutputDirectory"]["outputUriPrefix"]
    base = f"{base}/{trial}" if trial else base
    environ.update(AIP_MODEL_DIR=f"{base}/model/", AIP_CHECKPOINT_DIR=f"{base}/checkpoints/",
                   AIP_TENSORBOARD_LOG_DIR=f"{base}/logs/")
    return environ


def _job_spec(path):
    spec = validate.render(validate.load_spec(path), validate.SAMPLE_VALUES)
    return spec.get("trialJobSpec", spec), ("1" if "studySpec" in spec else "")


def _trainer_replicas(job_spec):
    """(pool, index) of every replica that runs the trainer (not Reduction Server)."""
    replicas = []
    for i, pool in enumerate(job_spec["workerPoolSpecs"]):
        image = pool.get("containerSpec", {}).get("imageUri", "")
        if pool and not validate.REDUCTION_SERVER_IMAGE.search(image):
            replicas += [(i, k) for k in range(pool["replicaCount"])]
    return replicas


def _trainer_config(job_spec):
    pool = job_spec["workerPoolSpecs"][0]
    args = (pool.get("containerSpec") or pool["pythonPackageSpec"])["args"]
    return validate.check_trainer_args(args)


# ------------------------------------------------- Every topology in deploy/


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_exactly_one_chief_writes(path):
    job_spec, trial = _job_spec(path)
    replicas = _trainer_replicas(job_spec)

    infos = {r: cluster.cluster_info(vertex_environ(job_spec, *r, trial=trial)) for r in replicas}

    assert [r for r, info in infos.items() if info.is_chief] == [(0, 0)]
    assert {info.num_workers for info in infos.values()} == {len(replicas)}
    assert {info.trial for info in infos.values()} == {trial}
    assert infos[(0, 0)].task_type == "chief"


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_strategy_fits_the_machine(path):
    name = os.path.basename(path)
    assert name in EXPECTED_STRATEGY, f"Add {name}'s strategy to EXPECTED_STRATEGY."
    job_spec, trial = _job_spec(path)
    config = _trainer_config(job_spec)
    machine = job_spec["workerPoolSpecs"][0]["machineSpec"]
    gpus = machine.get("acceleratorCount", 0) if "NVIDIA" in machine.get(
        "acceleratorType", "") else 0

    for replica in _trainer_replicas(job_spec):
        info = cluster.cluster_info(vertex_environ(job_spec, *replica, trial=trial))
        strategy = cluster.choose_strategy(config.strategy, config.tpu, info, gpus)
        assert strategy == EXPECTED_STRATEGY[name], replica


@pytest.mark.parametrize("path", SPECS, ids=os.path.basename)
def test_outputs_land_under_the_base_output_directory(path):
    job_spec, trial = _job_spec(path)
    base = job_spec["baseOutputDirectory"]["outputUriPrefix"] + (f"/{trial}" if trial else "")
    environ = vertex_environ(job_spec, 0, 0, trial=trial)

    dirs = config_lib.resolve_output_dirs("job", environ, job_dir_given=False)

    # Vertex AI's trailing "/" is dropped: "checkpoints/phase1", not "checkpoints//phase1".
    assert dirs == {"job_dir": base, "model_dir": f"{base}/model",
                    "checkpoint_dir": f"{base}/checkpoints", "log_dir": f"{base}/logs"}


def test_tuning_trials_keep_their_own_checkpoints():
    """Each trial's Config, as the trainer builds it from hptune.yaml's own args
    in that trial's environment, writes everything under its own folder.

    The trial folder in AIP_* is Vertex AI's (vertex_environ models its
    documented values); what is tested is the trainer's side: it follows
    AIP_* for every output, and derives its job dir (config.json,
    metrics.json) from it, so a spec that pinned --job_dir, or a trainer that
    ignored AIP_CHECKPOINT_DIR, would make trials share files and fail here.
    """
    job_spec, _ = _job_spec(os.path.join(validate.DEPLOY_DIR, "hptune.yaml"))
    args = job_spec["workerPoolSpecs"][0]["containerSpec"]["args"]
    base = job_spec["baseOutputDirectory"]["outputUriPrefix"]

    configs = {}
    for trial in ("1", "2"):
        fv = flags.FlagValues()
        config_lib.define_flags(fv)
        fv(["trainer.task", *args])
        configs[trial] = config_lib.config_from_flags(
            fv, environ=vertex_environ(job_spec, 0, 0, trial=trial), check_paths=False)

    for trial, config in configs.items():
        folders = [config.job_dir, config.model_dir, config.checkpoint_dir, config.log_dir]
        assert folders == [f"{base}/{trial}", f"{base}/{trial}/model",
                           f"{base}/{trial}/checkpoints", f"{base}/{trial}/logs"]
    assert configs["1"].hypertune_metric == "val_accuracy"


def test_workers_write_to_scratch_beside_the_chief():
    job_spec, _ = _job_spec(os.path.join(validate.DEPLOY_DIR, "multi_worker.yaml"))
    chief, worker = (cluster.cluster_info(vertex_environ(job_spec, *r)) for r in ((0, 0), (1, 1)))

    assert cluster.worker_dir("gs://b/model", chief) == "gs://b/model"
    assert cluster.worker_dir("gs://b/model", worker) == "gs://b/model.worker_worker_1"


# --------------------------------------------- Literal values from the docs


def test_documented_tf_config_of_a_worker():
    # Vertex AI's example: a tuning trial with a chief, two workers and a parameter server.
    tf_config = {
        "cluster": {"chief": ["training-workerpool0-abc-0:2222"],
                    "ps": ["training-workerpool2-abc-0:2222"],
                    "worker": ["training-workerpool1-abc-0:2222",
                               "training-workerpool1-abc-1:2222"]},
        "environment": "cloud", "job": {},
        "task": {"cloud": "xyz", "index": 0, "trial": "1", "type": "worker"},
    }

    info = cluster.cluster_info({"TF_CONFIG": json.dumps(tf_config)})

    assert info == cluster.ClusterInfo(
        task_type="worker", task_id=0, num_workers=3, has_chief_task=True, trial="1",
        # The other trainers, whom a restarting worker waits for; never the ps.
        peers=("training-workerpool0-abc-0:2222", "training-workerpool1-abc-1:2222"))
    assert not info.is_chief


def test_documented_cluster_spec_of_the_primary():
    cluster_spec = {
        "cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
                    "workerpool1": ["cmle-training-workerpool1-ab-0:2222",
                                    "cmle-training-workerpool1-ab-1:2222"],
                    "workerpool2": ["cmle-training-workerpool2-ab-0:2222",
                                    "cmle-training-workerpool2-ab-1:2222"],
                    "workerpool3": ["cmle-training-workerpool3-ab-0:2222"]},
        "environment": "cloud",
        "task": {"type": "workerpool0", "index": 0, "trial": "TRIAL_ID"},
        "job": {},
    }

    info = cluster.cluster_info({"CLUSTER_SPEC": json.dumps(cluster_spec)})

    assert (info.task_type, info.is_chief, info.num_workers, info.trial) == (
        "chief", True, 3, "TRIAL_ID")


def test_tf_config_wins_over_cluster_spec():
    environ = {
        "TF_CONFIG": json.dumps({"cluster": {"chief": ["c:1"], "worker": ["w:1"]},
                                 "task": {"type": "worker", "index": 0}}),
        "CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["c:1"]},
                                    "task": {"type": "workerpool0", "index": 0}}),
    }

    assert cluster.cluster_info(environ).task_type == "worker"


def test_without_a_chief_task_worker_0_writes():
    cluster_def = {"worker": ["w0:1", "w1:1", "w2:1"]}
    infos = [cluster.cluster_info({"TF_CONFIG": json.dumps(
        {"cluster": cluster_def, "task": {"type": "worker", "index": i}})}) for i in range(3)]

    assert [info.is_chief for info in infos] == [True, False, False]
    assert {info.num_workers for info in infos} == {3}


def test_master_is_the_chief():
    info = cluster.cluster_info({"TF_CONFIG": json.dumps(
        {"cluster": {"master": ["m:1"], "worker": ["w:1"]}, "task": {"type": "master"}})})

    assert (info.task_type, info.is_chief, info.num_workers) == ("chief", True, 2)


def test_evaluators_and_servers_never_write():
    for task_type in ("evaluator", "ps"):
        info = cluster.cluster_info({"TF_CONFIG": json.dumps(
            {"cluster": {"worker": ["w0:1", "w1:1"], "ps": ["p:1"]},
             "task": {"type": task_type, "index": 0}})})
        assert not info.is_chief
        assert info.num_workers == 2


def test_a_lone_process_is_the_chief():
    assert cluster.cluster_info({}) == cluster.ClusterInfo()
    assert cluster.cluster_info({"CLOUD_ML_TRIAL_ID": "7"}).trial == "7"
    assert cluster.choose_strategy("auto", "", cluster.ClusterInfo(), num_gpus=0) == "one_device"
