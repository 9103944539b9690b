"""Every benchmark keeps running: each one's ``--smoke`` mode, end to end.

A smoke run is the benchmark's own code at toy size (generated data, random
weights, seconds), writing to a temporary folder, never to
benchmarks/results/. Its speed figures mean nothing and are not checked; what
is checked is that it finishes, writes its JSON and markdown with the command
that made them, and the values that do not depend on speed.

To add a benchmark: one more ``Smoke`` entry in ``SMOKES``.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from typing import Callable, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


@dataclasses.dataclass(frozen=True)
class Smoke:
    """How to smoke-run one benchmark module."""

    module: str  # python -m benchmarks.<module>
    out_flag: str  # its flag naming the results folder
    check: Optional[Callable[[dict], None]] = None  # asserts on its JSON


def _frozen_forward(results):
    summary = results["summary"]
    # Folding BatchNorm must not change the features: a speed-independent value.
    assert summary["max_difference_relative_to_largest_feature"] < 1e-4
    assert summary["batch_norm_layers_folded"] == 52
    assert summary["median_speedup"] > 0


def _input_pipeline(results):
    assert results["images"] == 48
    rates = results["images_per_second"]
    assert {"decode_limit", "ours_local", "tutorial_local", "ours_gcs",
            "tutorial_gcs"} <= set(rates)
    assert [t["target"] for t in results["targets"]][0].startswith("ours_local")


def _phase2_throughput(results):
    assert results["summary"]["in_memory_images_per_second"] > 0
    assert len(results["rounds"]) == 1


def _tutorial_recipe(results):
    # One epoch, then phase 2 from the last one's index, as the notebook does
    # (initial_epoch=history.epoch[-1]): epoch 1 runs twice.
    assert [e["epoch"] for e in results["rounds"]] == [1, 1, 2]


def _recipe(results):
    # Our side runs the tutorial's schedule epoch for epoch: 1 + 1 here.
    assert [e["epoch"] for e in results["results"]["ours"]["epochs"]] == [1, 2]
    assert set(results["results"]) == {"tutorial", "ours"}


def _recipe_fit(results):
    sides = results["rounds"][0]["smoke"]
    assert sides["tutorial"]["learning_rates"] == [1e-3, 1e-5]
    auto = sides["auto"]
    assert [row["learning_rate"] for row in auto["search"]] == [1e-3, 1e-2]
    assert auto["learning_rates"][1] == pytest.approx(0.01 * auto["learning_rates"][0])


def _exports(results):
    measured = results["rounds"][0]
    assert list(measured["artifacts"]) == [
        "saved_model", "tflite_float", "tflite_float16", "tflite_dynamic_range", "tflite_int8",
        "onnx"]
    assert measured["count"] == 8  # The generated test split, every image run.
    # Speed-independent: the float conversions give the SavedModel's labels.
    for name in ("tflite_float", "onnx"):
        assert measured["artifacts"][name]["agreement"] == 1.0
    assert results["summary"]["int8_size_ratio_to_float32"] < 0.5


def _export_format(results):
    summary = results["summary"]
    # Speed-independent: the same network answers alike, and the files are smaller.
    assert summary["max_probability_difference"] == 0.0
    assert summary["size_mb"]["ratio"] < 1


def _cache_scale(results):
    rows = {row["path"]: row for row in results["rounds"]}
    assert set(rows) == {"memory", "spilled", "fallback", "side_by_side"}
    assert len(rows["side_by_side"]["rounds"]) == 1
    assert rows["memory"]["frontier_in_memory"] and not rows["spilled"]["frontier_in_memory"]


def _cache_reuse(results):
    first, second = results["rounds"]
    assert set(first["frozen_work"].values()) == {"computed"}
    assert second["frozen_work"]["pooled/original"] == "read"
    assert first["known_usable"] == 0 and second["known_usable"] == 24  # Not decoded again.


def _multilabel(results):
    data = results["rounds"][0]["data"]
    splits = data["splits"]
    # The seeded builder: the same mosaics, labels and photos every run.
    assert {s: splits[s]["mosaics"] for s in splits} == {"train": 16, "validation": 8, "test": 8}
    assert {s: splits[s]["label_counts"] for s in splits} == {
        "train": {"cat": 11, "dog": 9}, "validation": {"cat": 7, "dog": 3},
        "test": {"cat": 4, "dog": 5}}
    assert data["photos_in_two_splits"] == 0
    for split in splits.values():  # Labels are what the tiles hold.
        sets = split["label_sets"]
        assert split["label_counts"] == {"cat": sets["cat"] + sets["cat+dog"],
                                         "dog": sets["dog"] + sets["cat+dog"]}
    assert data["frequency_baselines"]["constant_micro_f1"] == pytest.approx(0.72)
    reference = results["rounds"][0]["single_label"]
    # The reference is tested on exactly the photos inside the test mosaics.
    assert reference["test_folder_is_test_mosaics_photos"]
    assert reference["test_count"] == sum(splits["test"]["distinct_photos"].values()) == 8
    multi = results["rounds"][0]["multi_label"]
    assert multi["task"] == results["summary"]["task"] == "multi_label"
    assert multi["test"]["count"] == 8
    assert all(multi["test"][key] is not None for key in (
        "micro_f1", "macro_f1", "mean_average_precision", "exact_match", "hamming_loss"))
    assert multi["image_size"] == reference["image_size"] == 32
    assert set(multi["thresholds"]) == {"cat", "dog"}
    assert all(0 <= t <= 1 for t in multi["thresholds"].values())


SMOKES = [
    Smoke("recipe", "out_dir", _recipe),
    Smoke("recipe_fit", "out_dir", _recipe_fit),
    Smoke("frozen_forward", "out_dir", _frozen_forward),
    Smoke("input_pipeline", "output_dir", _input_pipeline),
    Smoke("phase2_throughput", "out_dir", _phase2_throughput),
    Smoke("tutorial_recipe", "out_dir", _tutorial_recipe),
    Smoke("exports", "out_dir", _exports),
    Smoke("export_format", "out_dir", _export_format),
    Smoke("cache_scale", "out_dir", _cache_scale),
    Smoke("cache_reuse", "out_dir", _cache_reuse),
    Smoke("multilabel", "out_dir", _multilabel),
]


def _digest(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()


@pytest.mark.parametrize("smoke", SMOKES, ids=lambda s: s.module)
def test_benchmark_smoke_run(smoke, tmp_path):
    recorded = _digest(RESULTS)
    out_dir = tmp_path / "results"
    command = [sys.executable, "-m", f"benchmarks.{smoke.module}", "--smoke",
               f"--{smoke.out_flag}={out_dir}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out_dir / f"{smoke.module}.json") as f:
        results = json.load(f)
    assert "--smoke" in results["command"]
    assert (out_dir / f"{smoke.module}.md").read_text().strip()
    if smoke.check:
        smoke.check(results)
    assert _digest(RESULTS) == recorded  # The recorded results are left alone.
