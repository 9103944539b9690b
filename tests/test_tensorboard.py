"""TensorBoard as users open it: the real server over a finished job, read through HTTP.

The server runs as its own process on 127.0.0.1 and a free port, and the
test reads back what the dashboards show: scalar curves, the evaluation
pictures and the hparams entry. Every wait is bounded and the server is
always stopped.
"""

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from PIL import Image

START_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 20


def _tensorboard_command():
    # The console script users run, from this interpreter's environment.
    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "tensorboard.main"]


class _Server:
    def __init__(self, url, process, log_path):
        self.url, self.process, self.log_path = url, process, log_path

    def get(self, path, **query):
        target = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(target, timeout=REQUEST_TIMEOUT_S) as response:
            return response.read()

    def get_json(self, path, **query):
        return json.loads(self.get(path, **query))

    def post_json(self, path, body):
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]


@pytest.fixture(scope="module")
def tensorboard(finished_job, tmp_path_factory):
    """The tensorboard server over the finished job's log dir, once its runs are loaded."""
    config, _ = finished_job
    log_path = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with open(log_path, "w") as log:
        # Port 0: the server binds a port the OS picks, and prints its address.
        process = subprocess.Popen(
            _tensorboard_command() + ["--logdir", config.log_dir, "--host", "127.0.0.1",
                                      "--port", "0"],
            stdout=log, stderr=subprocess.STDOUT)
    server = _Server(None, process, log_path)
    try:
        server.url = _wait_for_address(server)
        _wait_for_runs(server, {"train", "validation", "evaluation"})
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for_address(server):
    """The http://127.0.0.1:PORT address the server printed once it listened."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"tensorboard exited with {server.process.returncode}:\n{server.log()}")
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", server.log())
        if found:
            return found.group(1)
        time.sleep(0.2)
    pytest.fail(f"tensorboard printed no address within {START_TIMEOUT_S}s:\n{server.log()}")


def _wait_for_runs(server, runs):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"tensorboard exited with {server.process.returncode}:\n{server.log()}")
        try:
            if runs <= set(server.get_json("/data/runs")):
                return
        except OSError:
            pass  # Not listening yet.
        time.sleep(0.5)
    pytest.fail(f"tensorboard did not show runs {runs} within {START_TIMEOUT_S}s:\n"
                f"{server.log()}")


def test_scalars_show_both_phases_and_the_evaluation(tensorboard, finished_job):
    _, metrics = finished_job
    tags = tensorboard.get_json("/data/plugin/scalars/tags")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(tags["train"])
    assert {"test/accuracy", "test/loss", "test/macro_f1"} <= set(tags["evaluation"])

    curve = tensorboard.get_json("/data/plugin/scalars/scalars", run="validation",
                                 tag="epoch_loss")
    assert [step for _, step, _ in curve] == [0, 1]  # Phase 2 continues phase 1's epochs.
    assert [value for _, _, value in curve] == pytest.approx(
        metrics["history"]["val_loss"], rel=1e-5)
    (_, _, accuracy), = tensorboard.get_json("/data/plugin/scalars/scalars", run="evaluation",
                                             tag="test/accuracy")
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])


@pytest.mark.parametrize("tag", ["confusion_matrix/test", "predictions/test",
                                 "worst_mistakes/test"])
def test_evaluation_pictures_are_served_as_png(tensorboard, tag):
    assert tag in tensorboard.get_json("/data/plugin/images/tags")["evaluation"]
    entry, = tensorboard.get_json("/data/plugin/images/images", run="evaluation", tag=tag,
                                  sample=0)
    png = tensorboard.get(f"/data/plugin/images/individualImage?{entry['query']}")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and min(image.size) >= 100


def test_pr_curves_dashboard_has_a_curve_per_class(tensorboard, finished_job):
    _, metrics = finished_job
    tags = tensorboard.get_json("/data/plugin/pr_curves/tags")["evaluation"]
    assert {f"pr_curve/{split}/{name}" for split in ("validation", "test")
            for name in metrics["class_names"]} <= set(tags)
    name = metrics["class_names"][0]
    entry, = tensorboard.get_json("/data/plugin/pr_curves/pr_curves", run="evaluation",
                                  tag=f"pr_curve/test/{name}")["evaluation"]
    # Threshold 0: every test image predicted, recall 1, precision the class's share.
    support = metrics["test"]["per_class"][name]["support"]
    assert entry["recall"][0] == 1.0
    assert entry["precision"][0] == pytest.approx(support / metrics["test"]["count"])
    # Thresholds 0, 0.01, ...; the plugin drops the tail where nothing is predicted.
    assert entry["thresholds"][:3] == pytest.approx([0.0, 0.01, 0.02])


def test_hparams_dashboard_lists_the_run_with_its_final_metrics(tensorboard, finished_job):
    config, metrics = finished_job
    experiment = tensorboard.post_json("/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {"backbone", "learning_rate", "label_smoothing", "lr_schedule"} <= {
        h["name"] for h in experiment["hparamInfos"]}
    assert "test/accuracy" in {m["name"]["tag"] for m in experiment["metricInfos"]}

    groups = tensorboard.post_json("/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"]})
    group, = groups["sessionGroups"]
    assert group["hparams"]["backbone"] == config.backbone
    assert group["hparams"]["lr_schedule"] == "cosine"
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert values["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert values["test/loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)
