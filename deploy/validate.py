"""Offline checks of the Vertex AI job specs in deploy/, before anyone pays.

A spec is rendered with sample placeholder values (the ones ``deploy.submit``
fills in for real) and parsed into the real ``google.cloud.aiplatform_v1``
types: a ``CustomJobSpec``, or a ``HyperparameterTuningJob`` when it has a
``studySpec``. The parser rejects unknown fields and enum values. On top of
it come the checks that gcloud or the service would make only at submit time,
or never:

* keys are camelCase (the protobuf parser also takes snake_case field names;
  gcloud reads ``--config`` by the camelCase names);
* worker pool 0, the chief, has exactly one replica; pools 1-3 are empty or
  have replicas, and every pool that runs the trainer runs the same arguments;
* the accelerator type and count fit the machine type, and a TPU VM gets
  ``--tpu=local``;
* every trainer argument is a real trainer flag with a valid value: parsed by
  the trainer's own ``define_flags`` on a fresh ``FlagValues`` and checked by
  its own validation (minus the existence of gs:// paths);
* outputs go to a ``baseOutputDirectory``; a ``tensorboard`` comes with a
  ``serviceAccount`` (Vertex AI TensorBoard requires one);
* tuning studies: one metric, reported by the trainer (``--hypertune_metric``),
  over parameters that are trainer flags whose bounds are valid values, and
  trials that do not share a ``--job_dir``;
* the file starts with a comment giving its run command and what to expect.

Command line (exit status 1 when any spec fails)::

    python -m deploy.validate                 # every deploy/*.yaml
    python -m deploy.validate deploy/gpu_l4.yaml
"""

import dataclasses
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml
from absl import flags

from deploy.machines import check_machine, is_tpu_host
from deploy.spec_files import (  # noqa: F401  (re-exported)
    DEPLOY_DIR, OPTIONAL_PLACEHOLDERS, PLACEHOLDER, PLACEHOLDERS, SAMPLE_VALUES, SpecError,
    check_header, load_spec, render, spec_paths)
from trainer import config as config_lib

CUSTOM_JOB = "custom_job"
TUNING_JOB = "hyperparameter_tuning_job"

# Vertex AI service images that run no trainer code.
REDUCTION_SERVER_IMAGE = re.compile(
    r"-docker\.pkg\.dev/vertex-ai-restricted/training/reductionserver:")
TRAINER_MODULE = "trainer.task"

_CAMEL_CASE = re.compile(r"^[a-z][a-zA-Z0-9]*$")
# Mappings whose keys are user data, not field names.
_FREE_KEY_FIELDS = frozenset({"labels", "trafficSplit"})

def spec_kind(spec: Mapping[str, Any]) -> str:
    """TUNING_JOB for a spec with a studySpec or trialJobSpec, else CUSTOM_JOB."""
    tuning_keys = {"studySpec", "trialJobSpec", "study_spec", "trial_job_spec"}
    return TUNING_JOB if tuning_keys & set(spec) else CUSTOM_JOB


# ------------------------------------------------------------- Validation


def validate_file(path: str) -> str:
    """Loads, renders with SAMPLE_VALUES and validates one spec; returns its kind."""
    spec = load_spec(path)
    try:
        rendered = render(spec, SAMPLE_VALUES)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    return validate_spec(rendered, where=path)


def validate_spec(spec: Mapping[str, Any], where: str = "spec") -> str:
    """Validates a rendered spec (a CustomJobSpec or HyperparameterTuningJob dict).

    Args:
      spec: the spec with placeholders filled, as YAML or request JSON gives it.
      where: a name for messages, usually the file.

    Returns:
      CUSTOM_JOB or TUNING_JOB.

    Raises:
      SpecError: the first problem found, naming the field.
    """
    check_camel_case(spec, where)
    kind = spec_kind(spec)
    message = parse(spec, kind, where)
    if kind == CUSTOM_JOB:
        check_custom_job_spec(message, where)
    else:
        check_tuning_job(message, where)
    return kind


def parse(spec: Mapping[str, Any], kind: str, where: str = "spec"):
    """The spec as an aiplatform_v1 message; unknown fields and bad enums raise."""
    return parse_message(spec, _message_type(kind), where)


def parse_message(spec: Mapping[str, Any], message_type, where: str = "spec",
                  error=SpecError):
    """``spec`` as a ``message_type`` (an aiplatform_v1 type); unknown fields and bad
    enums raise ``error``."""
    from google.protobuf import json_format

    pb = message_type.pb()()
    try:
        json_format.ParseDict(dict(spec), pb, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise error(f"{where}: not a valid {message_type.__name__}: {e}") from None
    return message_type.wrap(pb)


def _message_type(kind: str):
    try:
        from google.cloud import aiplatform_v1
    except ImportError as e:
        raise ImportError("Validating Vertex AI specs needs google-cloud-aiplatform: "
                          "pip install 'transfer-trainer[vertex]'.") from e
    if kind == CUSTOM_JOB:
        return aiplatform_v1.CustomJobSpec
    return aiplatform_v1.HyperparameterTuningJob


def check_camel_case(node: Any, where: str, path: str = "") -> None:
    """Every key of a spec is camelCase, as gcloud and the REST API name fields."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_camel_case(item, where, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            key_path = f"{path}.{key}" if path else str(key)
            if not (isinstance(key, str) and _CAMEL_CASE.match(key)):
                raise SpecError(f"{where}: key {key_path} must be camelCase "
                                f"({_to_camel(str(key))}).")
            if key not in _FREE_KEY_FIELDS:
                check_camel_case(value, where, key_path)


def _to_camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word.title() for word in rest)


def check_custom_job_spec(job_spec, where: str,
                          tuned_flags: Sequence[str] = ()) -> None:
    """Our rules for a parsed aiplatform_v1.CustomJobSpec.

    Args:
      job_spec: the parsed spec.
      where: a name for messages.
      tuned_flags: flags a tuning study sets on every trial (they must not be
        in the spec's own arguments).
    """
    pools = list(job_spec.worker_pool_specs)
    _check_pool_counts(pools, where)
    for i, pool in enumerate(pools):
        if _is_empty_pool(pool):
            continue
        check_machine(pool.machine_spec, f"{where}: workerPoolSpecs[{i}].machineSpec")
    trainer_args = _trainer_args(pools, where)
    for flag in tuned_flags:
        if any(_flag_name(arg) == flag for arg in trainer_args):
            raise SpecError(f"{where}: --{flag} is tuned by the study; remove it from args.")
    config = check_trainer_args(trainer_args, f"{where}: trainer args")
    chief_machine = pools[0].machine_spec.machine_type
    if is_tpu_host(chief_machine) and not config.tpu:
        raise SpecError(f"{where}: {chief_machine} is a TPU VM; pass --tpu=local, or the "
                        "trainer runs on the host's CPUs.")
    if not job_spec.base_output_directory.output_uri_prefix:
        raise SpecError(f"{where}: baseOutputDirectory.outputUriPrefix is required; without "
                        "it Vertex AI sets no AIP_* folders and outputs stay in the container.")
    if job_spec.tensorboard and not job_spec.service_account:
        raise SpecError(f"{where}: tensorboard needs a serviceAccount (Vertex AI TensorBoard "
                        "cannot write with the default service agent).")


def _check_pool_counts(pools, where: str) -> None:
    if not pools or _is_empty_pool(pools[0]):
        raise SpecError(f"{where}: workerPoolSpecs[0] (the chief) is required.")
    if len(pools) > 4:
        raise SpecError(f"{where}: at most 4 worker pools (chief, workers, parameter or "
                        f"Reduction servers, evaluators); got {len(pools)}.")
    if pools[0].replica_count != 1:
        raise SpecError(f"{where}: workerPoolSpecs[0].replicaCount must be 1 (one chief); got "
                        f"{pools[0].replica_count}. Put more machines in workerPoolSpecs[1].")
    for i, pool in enumerate(pools[1:], start=1):
        if not _is_empty_pool(pool) and pool.replica_count < 1:
            raise SpecError(f"{where}: workerPoolSpecs[{i}].replicaCount must be at least 1.")


def _is_empty_pool(pool) -> bool:
    return not pool.machine_spec.machine_type and not pool.replica_count


def _trainer_args(pools, where: str) -> List[str]:
    """The trainer arguments, the same in every pool that runs the trainer."""
    args_by_pool = {}
    for i, pool in enumerate(pools):
        if _is_empty_pool(pool):
            continue
        args = _pool_trainer_args(pool, f"{where}: workerPoolSpecs[{i}]")
        if args is not None:
            args_by_pool[i] = args
    if 0 not in args_by_pool:
        raise SpecError(f"{where}: workerPoolSpecs[0] must run the trainer.")
    for i, args in args_by_pool.items():
        if args != args_by_pool[0]:
            raise SpecError(f"{where}: workerPoolSpecs[{i}] runs the trainer with other args "
                            "than pool 0; all workers of a job must train the same way.")
    return args_by_pool[0]


def _pool_trainer_args(pool, where: str) -> Optional[List[str]]:
    """The pool's trainer args, or None for a pool that runs no trainer."""
    if "python_package_spec" in pool:
        package = pool.python_package_spec
        if package.python_module != TRAINER_MODULE:
            raise SpecError(f"{where}.pythonPackageSpec.pythonModule must be {TRAINER_MODULE}.")
        if not package.package_uris or not package.executor_image_uri:
            raise SpecError(f"{where}.pythonPackageSpec needs executorImageUri and packageUris.")
        return list(package.args)
    if "container_spec" in pool:
        container = pool.container_spec
        if REDUCTION_SERVER_IMAGE.search(container.image_uri):
            return None
        if container.command:
            raise SpecError(f"{where}.containerSpec.command replaces the image's entry point "
                            f"(python -m {TRAINER_MODULE}); pass args only.")
        return list(container.args)
    raise SpecError(f"{where}: needs a containerSpec or a pythonPackageSpec.")


def _flag_name(arg: str) -> str:
    return arg.lstrip("-").split("=", 1)[0]


def check_trainer_args(args: Sequence[str], where: str = "trainer args") -> config_lib.Config:
    """Parses ``args`` with the trainer's own flags and validates the result.

    Args:
      args: the arguments Vertex AI passes to ``python -m trainer.task``.
      where: a name for messages.

    Returns:
      The Config the trainer would build (under sample AIP_* folders).

    Raises:
      SpecError: an unknown flag, a value of the wrong type, a value the
        trainer rejects, or a positional argument.
    """
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    try:
        leftover = flag_values(["trainer.task", *args])
    except flags.Error as e:
        raise SpecError(f"{where}: {e}") from None
    if leftover[1:]:
        raise SpecError(f"{where}: not flags: {leftover[1:]} (write --name=value).")
    try:
        return config_lib.config_from_flags(flag_values, environ=_sample_aip_environ(),
                                            check_paths=False)
    except config_lib.ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def _sample_aip_environ() -> Dict[str, str]:
    base = f"gs://{SAMPLE_VALUES['BUCKET']}/jobs/{SAMPLE_VALUES['JOB_NAME']}"
    return {"AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/"}


def check_tuning_job(job, where: str) -> None:
    """Our rules for a parsed aiplatform_v1.HyperparameterTuningJob."""
    study = job.study_spec
    if len(study.metrics) != 1:
        raise SpecError(f"{where}: studySpec.metrics must hold exactly one metric (the trainer "
                        f"reports one); got {len(study.metrics)}.")
    metric = study.metrics[0].metric_id
    if not job.max_trial_count:
        raise SpecError(f"{where}: maxTrialCount is required.")
    tuned = [p.parameter_id for p in study.parameters]
    if not tuned:
        raise SpecError(f"{where}: studySpec.parameters is empty: nothing to tune.")
    trial_where = f"{where}: trialJobSpec"
    check_custom_job_spec(job.trial_job_spec, trial_where, tuned_flags=tuned)
    args = _trainer_args(list(job.trial_job_spec.worker_pool_specs), trial_where)
    config = check_trainer_args(args, f"{trial_where} args")
    if config.hypertune_metric != metric:
        raise SpecError(f"{trial_where}: args must report the study's metric: "
                        f"--hypertune_metric={metric} (got {config.hypertune_metric!r}).")
    if any(_flag_name(arg) == "job_dir" for arg in args):
        raise SpecError(f"{trial_where}: --job_dir would put every trial in one folder, and "
                        "trials would resume from each other's checkpoints; leave it to "
                        "baseOutputDirectory (Vertex AI gives each trial its own).")
    for parameter in study.parameters:
        _check_parameter(parameter, args, f"{where}: studySpec parameter "
                                          f"{parameter.parameter_id!r}")


def _check_parameter(parameter, args: Sequence[str], where: str) -> None:
    """Every value the study may try is a valid value of the trainer flag."""
    values = _parameter_values(parameter)
    if not values:
        raise SpecError(f"{where}: needs a double, integer, categorical or discrete value spec.")
    for value in values:
        check_trainer_args([*args, f"--{parameter.parameter_id}={value}"], where)


def _parameter_values(parameter) -> List[Any]:
    """The bounds (or all choices) of a study parameter."""
    if "double_value_spec" in parameter:
        spec = parameter.double_value_spec
        return [repr(spec.min_value), repr(spec.max_value)]
    if "integer_value_spec" in parameter:
        spec = parameter.integer_value_spec
        return [spec.min_value, spec.max_value]
    if "categorical_value_spec" in parameter:
        return list(parameter.categorical_value_spec.values)
    if "discrete_value_spec" in parameter:
        return [repr(v) for v in parameter.discrete_value_spec.values]
    return []


# ------------------------------------------------------------ Command line


@dataclasses.dataclass
class _Result:
    path: str
    kind: str = ""
    error: str = ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Validates the given specs (default: every deploy/*.yaml); 0 when all pass."""
    paths = list(sys.argv[1:] if argv is None else argv) or spec_paths()
    results = []
    for path in paths:
        try:
            results.append(_Result(path, kind=validate_file(path)))
        except (SpecError, OSError, yaml.YAMLError) as e:
            results.append(_Result(path, error=str(e)))
    for result in results:
        status = f"ok ({result.kind})" if not result.error else f"FAILED\n    {result.error}"
        print(f"{os.path.relpath(result.path)}: {status}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
