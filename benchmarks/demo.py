"""The README's demo command, run as a user runs it, timed, with what it printed.

Run (about 2 minutes on 2 cores):

    python -m benchmarks.demo

Runs ``python -m trainer.task --job_dir=<a temporary folder>`` (the demo: no
--data_dir) in a fresh process, and records its wall time, the accuracy line
it printed and the test split's metrics from its metrics.json, which the
README and docs/results.md quote. Results go to
benchmarks/results/demo.{json,md}. The test suite runs the same command with
its accuracy asserted (tests/test_demo.py).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from benchmarks import report

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where demo.json and demo.md are written.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="demo_bench_") as folder:
        job_dir = os.path.join(folder, "job")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        env.pop("TF_CONFIG", None)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "trainer.task", f"--job_dir={job_dir}"],
                                cwd=REPO, env=env, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        with open(os.path.join(job_dir, "metrics.json")) as f:
            metrics = json.load(f)
    [printed] = re.findall(r"^Accuracy: .*$", result.stdout, re.MULTILINE)
    summary = {"seconds": seconds, "printed": printed,
               "load_average_at_end": os.getloadavg()[0],
               "class_names": metrics["class_names"],
               "test": metrics["test"], "validation_accuracy": metrics["validation"]["accuracy"]}
    command = "python -m benchmarks.demo " + " ".join(sys.argv[1:])
    test = metrics["test"]
    lines = ["# The demo command", "", "```", command, "```", "",
             f"Runs `python -m trainer.task` (the demo) in a fresh process on {os.cpu_count()} "
             f"cores (load average {summary['load_average_at_end']:.1f} at the end).", "",
             f"- Wall time, start to exit: **{seconds:.0f} s**.",
             f"- It printed: `{printed}`",
             f"- Test split: {test['count']} images, accuracy {test['accuracy']:.4f}, loss "
             f"{test['loss']:.3f}, confusion matrix {test['confusion_matrix']} "
             f"({', '.join(metrics['class_names'])}).", ""]
    print("\n".join(lines))
    report.write(FLAGS.out_dir, "demo", command, [], summary, lines)


if __name__ == "__main__":
    app.run(main)
