"""The trainer image, checked without Docker: the Dockerfile parses, its base
image carries the TensorFlow that setup.py pins, it runs the trainer's entry
module as a non-root user, and no credentials reach the image or the build
context (.dockerignore).
"""

import ast
import fnmatch
import importlib.util
import json
import os
import pathlib
import re

import pytest
from dockerfile_parse import DockerfileParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDENTIAL = re.compile(r"credential|secret|service[-_]account|key\.json|\.pem$|\.env$|"
                        r"\.config/gcloud|application_default", re.IGNORECASE)


@pytest.fixture(scope="module")
def dockerfile():
    return DockerfileParser(path=os.path.join(REPO, "Dockerfile"))


def _instructions(dockerfile, name):
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def _setup_tf_version():
    """TF_VERSION from setup.py, read without running setup()."""
    tree = ast.parse(pathlib.Path(REPO, "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "TF_VERSION" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no TF_VERSION")


def test_base_image_is_the_pinned_tensorflow_gpu_image(dockerfile):
    image, _, tag = dockerfile.baseimage.partition(":")
    version, _, variant = tag.partition("-")

    assert image == "tensorflow/tensorflow"
    assert variant == "gpu"
    assert re.fullmatch(re.escape(_setup_tf_version()) + r"\.\d+", version), tag


def test_entry_point_runs_the_trainer_module(dockerfile):
    (entrypoint,) = _instructions(dockerfile, "ENTRYPOINT")
    command = json.loads(entrypoint)  # Exec form: signals reach Python.

    assert command == ["python", "-m", "trainer.task"]
    spec = importlib.util.find_spec(command[2])
    assert spec is not None and os.path.samefile(
        spec.origin, os.path.join(REPO, "trainer", "task.py"))


def test_runs_as_a_non_root_user(dockerfile):
    users = _instructions(dockerfile, "USER")

    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Nothing after the last USER switches back to root.
    last_user = max(i for i, x in enumerate(dockerfile.structure) if x["instruction"] == "USER")
    assert all(x["instruction"] != "USER" for x in dockerfile.structure[last_user + 1:])


def test_installs_the_package_from_its_own_files(dockerfile):
    sources = [value.split()[:-1] for value in _instructions(dockerfile, "COPY")]

    assert sorted(s for source in sources for s in source) == ["setup.py", "trainer"]
    assert not _instructions(dockerfile, "ADD")  # No remote or archive magic.
    assert any("pip install" in run and "/tmp/trainer-src" in run
               for run in _instructions(dockerfile, "RUN"))


def test_no_credentials_are_copied_or_set(dockerfile):
    copied = _instructions(dockerfile, "COPY") + _instructions(dockerfile, "ADD")
    env = " ".join(_instructions(dockerfile, "ENV") + _instructions(dockerfile, "ARG"))

    assert not any(CREDENTIAL.search(value) for value in copied), copied
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env


def _ignored(path, patterns):
    """Docker's rule: the last matching pattern wins; '!' re-includes.

    A pattern also matches everything under a matching folder; '**' matches
    any number of folders.
    """
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_package():
    lines = pathlib.Path(REPO, ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    kept = ["setup.py", "trainer/task.py", "trainer/data/pipeline.py"]
    left_out = [".venv/bin/python", "job/model/saved_model.pb", "runs/demo/metrics.json",
                "tests/conftest.py", "tests/data/cat.jpg", ".git/config", "deploy/gpu_l4.yaml",
                "credentials.json", "my-project-1234-key.json", "trainer/service-account.json",
                "trainer/__pycache__/task.cpython-311.pyc", ".env", "trainer/.env"]
    assert [p for p in kept if _ignored(p, patterns)] == []
    assert [p for p in left_out if not _ignored(p, patterns)] == []
