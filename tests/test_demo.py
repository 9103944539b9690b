"""The README's demo command itself: ``python -m trainer.task`` with no --data_dir.

It generates its data, pre-trains the demo backbone on the source task and
transfers it; the accuracy it prints must be far above chance (1/3), with a
bar that holds whatever recipe the demo preset settles on. About 90 s on 2
idle cores.
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAR = 0.8  # Recorded runs print 0.9 or more; chance is 1/3.


@pytest.mark.timeout(900)
def test_demo_command_learns_the_shapes(tmp_path):
    job_dir = tmp_path / "job"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "trainer.task", f"--job_dir={job_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [printed] = re.findall(r"^Accuracy: (\{.*\})$", result.stdout, re.MULTILINE)
    accuracy = json.loads(printed)
    assert accuracy["test"] >= BAR and accuracy["validation"] >= BAR, accuracy
    with open(job_dir / "metrics.json") as f:
        metrics = json.load(f)
    assert round(metrics["test"]["accuracy"], 4) == accuracy["test"]
    assert metrics["class_names"] == ["circle", "square", "triangle"]
    assert f"Model:       {job_dir}/model" in result.stdout
