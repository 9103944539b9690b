"""Reading Vertex AI spec files: their header, their YAML and their placeholders.

A spec in deploy/ is YAML with ``{NAME}`` placeholders that ``deploy.submit``
fills in (``SAMPLE_VALUES`` stand in for them in offline checks), opening with
comments that give its run command and what to expect.
"""

import glob
import os
import re
from typing import Any, Dict, List, Mapping

import yaml

DEPLOY_DIR = os.path.dirname(os.path.abspath(__file__))

PLACEHOLDER = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")
# Filled in by deploy.submit. A key whose whole value is an optional
# placeholder left unset is dropped from the request.
PLACEHOLDERS = ("PROJECT", "REGION", "BUCKET", "IMAGE_URI", "PACKAGE_URI", "DATA_DIR",
                "SERVICE_ACCOUNT", "JOB_NAME", "TENSORBOARD")
OPTIONAL_PLACEHOLDERS = frozenset({"TENSORBOARD"})
SAMPLE_VALUES = {
    "PROJECT": "example-project",
    "REGION": "us-central1",
    "BUCKET": "example-bucket",
    "IMAGE_URI": "us-central1-docker.pkg.dev/example-project/trainer/trainer:latest",
    "PACKAGE_URI": "gs://example-bucket/packages/example-job/transfer-trainer.tar.gz",
    "DATA_DIR": "gs://example-bucket/data",
    "SERVICE_ACCOUNT": "vertex-trainer@example-project.iam.gserviceaccount.com",
    "JOB_NAME": "example-job",
    "TENSORBOARD": "projects/example-project/locations/us-central1/tensorboards/123",
}


class SpecError(ValueError):
    """A spec that would fail at submit time or run wrongly; says where and why."""


# ------------------------------------------------------------------ Loading


def spec_paths(deploy_dir: str = DEPLOY_DIR) -> List[str]:
    """Every spec in ``deploy_dir``, sorted."""
    return sorted(glob.glob(os.path.join(deploy_dir, "*.yaml")))


def load_spec(path: str) -> Dict[str, Any]:
    """Reads a spec file; its header comment is checked, its YAML returned."""
    with open(path) as f:
        text = f.read()
    check_header(text, path)
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: not a YAML mapping.")
    return spec


def check_header(text: str, path: str, command: str = "") -> None:
    """The file opens with comments giving its run command and what to expect.

    Args:
      text: the file's text.
      path: the file, for messages.
      command: the run command the header must contain; default
        ``python -m deploy.submit deploy/<file name>``.
    """
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = "\n".join(header)
    command = command or f"python -m deploy.submit deploy/{os.path.basename(path)}"
    if command not in header_text:
        raise SpecError(f"{path}: the header comment must give the run command "
                        f"({command!r} ...).")
    if "# Expect" not in header_text:
        raise SpecError(f"{path}: the header comment must say what to expect "
                        "(a line starting '# Expect').")


def render(spec: Any, values: Mapping[str, str]) -> Any:
    """Returns ``spec`` with ``{NAME}`` placeholders replaced by ``values``.

    Args:
      spec: parsed YAML.
      values: placeholder values; optional placeholders may be missing.

    Raises:
      SpecError: an unknown placeholder, a required one without a value, or
        an unquoted placeholder (which YAML reads as a mapping).
    """
    if isinstance(spec, dict):
        _reject_unquoted_placeholder(spec)
        rendered = {}
        for key, value in spec.items():
            if _is_unset_optional(value, values):
                continue
            rendered[key] = render(value, values)
        return rendered
    if isinstance(spec, list):
        return [render(item, values) for item in spec]
    if isinstance(spec, str):
        return PLACEHOLDER.sub(lambda m: _placeholder_value(m.group(1), values), spec)
    return spec


def _is_unset_optional(value: Any, values: Mapping[str, str]) -> bool:
    match = PLACEHOLDER.fullmatch(value) if isinstance(value, str) else None
    return bool(match and match.group(1) in OPTIONAL_PLACEHOLDERS
                and not values.get(match.group(1)))


def _placeholder_value(name: str, values: Mapping[str, str]) -> str:
    if name not in PLACEHOLDERS:
        raise SpecError(f"Unknown placeholder {{{name}}}; known: {list(PLACEHOLDERS)}.")
    if not values.get(name):
        raise SpecError(f"Placeholder {{{name}}} has no value.")
    return values[name]


def _reject_unquoted_placeholder(node: dict) -> None:
    if len(node) == 1:
        (key, value), = node.items()
        if value is None and isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SpecError(f'Unquoted placeholder {{{key}}}: YAML reads it as a '
                            f'mapping; write "{{{key}}}".')
