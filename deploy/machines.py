"""Which accelerators, in which counts, each Vertex AI machine type takes."""

import re
from typing import Optional

from deploy.spec_files import SpecError


# Machine families with built-in GPUs: the type is fixed, the count is in the
# name (a2-highgpu-4g has 4).
_BUILT_IN_GPUS = {
    "a2-highgpu-": "NVIDIA_TESLA_A100",
    "a2-megagpu-": "NVIDIA_TESLA_A100",
    "a2-ultragpu-": "NVIDIA_A100_80GB",
    "a3-highgpu-": "NVIDIA_H100_80GB",
    "a3-megagpu-": "NVIDIA_H100_MEGA_80GB",
    "a3-ultragpu-": "NVIDIA_H200_141GB",
    "a4-highgpu-": "NVIDIA_B200",
}
# G2 machines carry NVIDIA L4s; the count is not in the name.
_G2_L4_COUNTS = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1,
                 "g2-standard-16": 1, "g2-standard-24": 2, "g2-standard-32": 1,
                 "g2-standard-48": 4, "g2-standard-96": 8}
# N1 machines take attached GPUs in these counts.
_N1_GPU_COUNTS = {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (1, 2, 4, 8),
                  "NVIDIA_TESLA_P100": (1, 2, 4), "NVIDIA_TESLA_P4": (1, 2, 4)}
# TPU VM hosts: ct5lp-hightpu-4t is one host with four TPU v5e chips.
_TPU_HOSTS = {"ct5lp-hightpu-": "TPU_V5_LITEPOD"}



def check_machine(machine_spec, where: str) -> None:
    """The accelerator type and count of an aiplatform_v1.MachineSpec fit the machine type."""
    machine = machine_spec.machine_type
    accelerator = machine_spec.accelerator_type.name
    count = machine_spec.accelerator_count
    if not machine:
        raise SpecError(f"{where}.machineType is required.")
    if accelerator == "ACCELERATOR_TYPE_UNSPECIFIED":
        accelerator = ""
    if bool(accelerator) != bool(count):
        raise SpecError(f"{where}: acceleratorType and acceleratorCount go together; "
                        f"got {accelerator or 'no type'} x {count}.")
    allowed = _allowed_accelerators(machine)
    if allowed is None:
        raise SpecError(f"{where}: machineType {machine} is not a family this validator "
                        "knows; add it to deploy/machines.py.")
    if accelerator and (accelerator, count) not in allowed:
        options = ", ".join(f"{a} x {c}" for a, c in sorted(allowed)) or "no accelerator"
        raise SpecError(f"{where}: {machine} cannot take {accelerator} x {count}; "
                        f"it takes {options}.")
    if not accelerator and _requires_accelerator(machine):
        raise SpecError(f"{where}: {machine} comes with accelerators; set acceleratorType "
                        f"and acceleratorCount ({sorted(allowed)}).")


def _allowed_accelerators(machine: str) -> Optional[set]:
    """(type, count) pairs a machine takes; empty for CPU-only, None if unknown."""
    for prefix, gpu in _BUILT_IN_GPUS.items():
        match = re.fullmatch(re.escape(prefix) + r"(\d+)g", machine)
        if match:
            return {(gpu, int(match.group(1)))}
    if machine in _G2_L4_COUNTS:
        return {("NVIDIA_L4", _G2_L4_COUNTS[machine])}
    for prefix, tpu in _TPU_HOSTS.items():
        match = re.fullmatch(re.escape(prefix) + r"(\d+)t", machine)
        if match:
            return {(tpu, int(match.group(1)))}
    if machine == "cloud-tpu":
        return {("TPU_V2", 8), ("TPU_V3", 8)}
    if machine.startswith("n1-"):
        return {(gpu, n) for gpu, counts in _N1_GPU_COUNTS.items() for n in counts}
    if re.match(r"(n2|n2d|e2|c2|c2d|m1)-", machine):
        return set()
    return None


def _requires_accelerator(machine: str) -> bool:
    # TPU hosts may leave the accelerator implicit (tpuTopology says the slice).
    return machine in _G2_L4_COUNTS or any(machine.startswith(p) for p in _BUILT_IN_GPUS)


def is_tpu_host(machine: str) -> bool:
    """A TPU VM host (the trainer needs --tpu=local there)."""
    return machine.startswith(tuple(_TPU_HOSTS))
