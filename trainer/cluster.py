"""Who am I in the job, and which tf.distribute strategy to build.

Reads ``TF_CONFIG`` (set by Vertex AI for multi-replica jobs only, and by our
own multi-worker tests). Vertex AI also sets ``CLUSTER_SPEC`` on every replica,
whose ``workerpool0`` is the chief pool; ``TF_CONFIG`` carries the same
information in TensorFlow's own vocabulary (``chief`` / ``worker`` / ``ps``),
so TF_CONFIG is used when present and CLUSTER_SPEC only as a fallback (a
single-replica job has only CLUSTER_SPEC). Vertex AI's pool 2 may be a
Reduction Server, which shows up as ``ps``: it runs no trainer and is never
counted as a worker. Exactly one process is chief: the chief task, else
worker 0 when there is no chief task.
"""

import dataclasses
import json
import os
from typing import Mapping, Optional, Tuple

import tensorflow as tf

# Vertex AI's pool order: workerpool0 is the chief pool, 1 the workers,
# 2 the parameter servers (or Reduction Server), 3 the evaluators.
_POOL_ROLES = {"workerpool0": "chief", "workerpool1": "worker",
               "workerpool2": "ps", "workerpool3": "evaluator"}
# Set by trainer/recovery.py when a trainer restarts itself in place: how often it has.
RESTARTS_ENV = "TRAINER_RESTARTS"
# Older TF_CONFIG producers name the chief "master"; TensorFlow wants "chief".
_TASK_ALIASES = {"master": "chief"}


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the job."""

    task_type: str = "chief"
    task_id: int = 0
    num_workers: int = 1  # Chief plus workers: the processes that train.
    has_chief_task: bool = True
    trial: str = ""  # Vertex AI hyperparameter tuning trial id; "" outside a study.
    peers: Tuple[str, ...] = ()  # host:port of the other training processes.
    restarts: int = 0  # In-place restarts so far (trainer/recovery.py).

    @property
    def is_chief(self) -> bool:
        """The chief writes summaries, exports and final files.

        Without a chief task, worker 0 is the chief (TensorFlow's convention).
        """
        return self.task_type == "chief" or (
            self.task_type == "worker" and self.task_id == 0 and not self.has_chief_task)

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1


def cluster_info(environ: Optional[Mapping[str, str]] = None) -> ClusterInfo:
    """Reads this process's role from TF_CONFIG, else CLUSTER_SPEC.

    Args:
      environ: the environment to read; ``os.environ`` when None.

    Returns:
      The ClusterInfo; a lone chief when neither TF_CONFIG nor CLUSTER_SPEC is set.
    """
    environ = os.environ if environ is None else environ
    restarts = int(environ.get(RESTARTS_ENV) or 0)
    if environ.get("TF_CONFIG"):
        cluster, task = _parse_cluster(json.loads(environ["TF_CONFIG"]), _TASK_ALIASES)
    elif environ.get("CLUSTER_SPEC"):
        cluster, task = _parse_cluster(json.loads(environ["CLUSTER_SPEC"]), _POOL_ROLES)
    else:
        return ClusterInfo(trial=environ.get("CLOUD_ML_TRIAL_ID", ""), restarts=restarts)
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    task_type, task_id = task.get("type") or "chief", int(task.get("index", 0))
    return ClusterInfo(
        task_type=task_type,
        task_id=task_id,
        num_workers=max(num_workers, 1),
        has_chief_task=bool(cluster.get("chief")),
        # cloudml-hypertune's own variable backs up the documented task.trial.
        trial=str(task.get("trial") or environ.get("CLOUD_ML_TRIAL_ID") or ""),
        peers=tuple(address for job in ("chief", "worker")
                    for index, address in enumerate(cluster.get(job, []))
                    if (job, index) != (task_type, task_id)),
        restarts=restarts,
    )


def _parse_cluster(value: dict, roles: Mapping[str, str]):
    """(cluster, task) of a TF_CONFIG or CLUSTER_SPEC value, in TensorFlow's task names."""
    cluster = {roles.get(name, name): hosts for name, hosts in value.get("cluster", {}).items()}
    task = dict(value.get("task", {}))
    if "type" in task:
        task["type"] = roles.get(task["type"], task["type"])
    return cluster, task


def choose_strategy(requested: str, tpu: str, info: ClusterInfo, num_gpus: int) -> str:
    """Resolves ``--strategy=auto`` to a concrete strategy name."""
    if requested != "auto":
        return requested
    if tpu:
        return "tpu"
    if info.is_multi_worker:
        return "multi_worker"
    if num_gpus > 1:
        return "mirrored"
    return "one_device"


def create_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """Builds the named strategy. Must run before any other TensorFlow op."""
    if name == "one_device":
        # The default strategy: one replica on the first GPU, else the CPU.
        # (Keras's BackupAndRestore does not accept OneDeviceStrategy.)
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=_communication_options())
    if name == "tpu":
        return _create_tpu_strategy(tpu)
    raise ValueError(f"Unknown strategy {name!r}.")


def _communication_options() -> tf.distribute.experimental.CommunicationOptions:
    """NCCL between GPU hosts, the runtime's choice (a gRPC ring) otherwise.

    AUTO does not pick NCCL across hosts; NCCL is the faster all-reduce there
    and the transport Vertex AI's Reduction Server plugs into.
    """
    implementation = tf.distribute.experimental.CommunicationImplementation
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL)
    return tf.distribute.experimental.CommunicationOptions(implementation=implementation.AUTO)


def _create_tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:  # OSError: no metadata server.
        raise RuntimeError(
            f"--strategy=tpu: no TPU reachable (--tpu={tpu!r}): {e}") from e
    return tf.distribute.TPUStrategy(resolver)


def worker_dir(directory: str, info: ClusterInfo) -> str:
    """Where this worker writes files that only the chief's copy should keep.

    Under MultiWorkerMirroredStrategy every worker must run saves (they hold
    collective ops); non-chief workers write to a scratch folder beside the
    real one, which the caller removes afterwards. Beside, not inside: the
    chief replaces its folder as a whole (export's atomic swap), which would
    pull a scratch folder inside it away from a worker still writing there.
    """
    if info.is_chief:
        return directory
    return f"{directory.rstrip('/')}.worker_{info.task_type}_{info.task_id}"
