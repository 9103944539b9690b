"""benchmarks/data_forms.py --smoke: the benchmark's own code on tiny generated data.

Besides keeping the benchmark runnable, this is the end-to-end check that an
import CSV and an import JSONL of a folder's images give the same splits and
the same trained result (identical metrics) as the folder itself.
"""

import json
import os

from benchmarks import data_forms


def test_smoke_run_folders_csv_and_jsonl_train_alike(tmp_path):
    summary = data_forms.run("", "", str(tmp_path / "out"), smoke=True,
                             work_dir=str(tmp_path / "work"), keep_fraction=0.1,
                             command="python -m benchmarks.data_forms --smoke")
    with open(tmp_path / "out" / "data_forms.json") as f:
        written = json.load(f)
    rounds = {r["name"]: r for r in written["rounds"]}
    assert written["command"] == "python -m benchmarks.data_forms --smoke"
    assert summary["same_splits"]
    for form in ("csv", "jsonl"):
        assert rounds[form]["validation"] == rounds["folders"]["validation"], form
        assert rounds[form]["test"] == rounds["folders"]["test"], form
    assert "import file (CSV)" in rounds["csv"]["layout"]
    assert "import file (JSONL)" in rounds["jsonl"]["layout"]
    # (b): train keeps 2 of 20 circles; validation and test untouched.
    assert rounds["imbalanced_none"]["counts"]["train"] == 22
    assert rounds["imbalanced_none"]["counts"]["validation"] == rounds["csv"]["counts"][
        "validation"]
    assert set(summary["balanced_accuracy"]["validation"]) == {"none", "balanced"}
    with open(tmp_path / "work" / "import.csv") as f:
        first = f.readline().strip().split(",")
    assert first[0] == "training" and os.path.isabs(first[1])
    assert (tmp_path / "out" / "data_forms.md").read_text().startswith("# Data forms")
