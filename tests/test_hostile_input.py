"""Hostile input: decompression bombs (prepare, the raw-folder check, predict) and damaged shards.

A bomb is skipped (or, in predict, refused) by its header's size, by path,
and the process's peak memory stays bounded; a missing or truncated shard is
an error naming it before training, a corrupt one an error naming it when
read. The bombs are real, decodable PNGs (tests/hostile_files.py).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import hostile_files
from conftest import tiny_config
from test_task import REPO
from trainer import cluster
from trainer import predict
from trainer import train
from trainer.data import images
from trainer.data import pipeline
from trainer.data import prepare as prepare_lib
from trainer.data import screen

# 144 M pixels: over --max_image_pixels' default (89.5 M) but under Pillow's own hard stop
# (twice that), so only the trainer's limit keeps it from being decoded (432 MB as RGB).
BOMB = (12000, 12000)
# The example: 1.6 G pixels, 4.8 GB as RGB, 1.6 MB as a file; Pillow's stop catches it too.
HUGE_BOMB = (40000, 40000)
RSS_BOUND_MB = 200  # Python + Pillow take about 30 MB; decoding BOMB alone takes 144 MB more.


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for size in (BOMB, HUGE_BOMB):
        paths[size] = str(folder / f"bomb_{size[0]}.png")
        with open(paths[size], "wb") as f:
            f.write(hostile_files.png_bomb(*size))
    return paths


# Peak memory of the child's own address space: VmHWM, which exec resets. (getrusage's
# ru_maxrss would not do: Linux carries the parent's peak, forked with it, across exec.)
_MEASURE = """
import json, sys
from trainer.data import images
with open(sys.argv[1], "rb") as f:
    data = f.read()
checked = images.check_image(data)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
print(json.dumps({"status": checked.status, "reason": checked.reason, "file_bytes": len(data),
                  "peak_rss_mb": round(peak_kb / 1024, 1)}))
"""


@pytest.mark.parametrize("size", [BOMB, HUGE_BOMB], ids=["12000x12000", "40000x40000"])
def test_a_bomb_is_skipped_by_its_header_with_bounded_memory(bombs, size):
    out = subprocess.run([sys.executable, "-c", _MEASURE, bombs[size]], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    result = json.loads(out)
    print(f"{size}: {result}")
    assert result["status"] == images.SKIPPED
    assert result["reason"].startswith("too large to decode safely")
    if size == BOMB:
        assert "12000x12000 = 144,000,000 pixels, over --max_image_pixels=89,478,485" in \
            result["reason"]
    assert result["peak_rss_mb"] < RSS_BOUND_MB


def _folder_with_a_bomb(binary_dir, bomb, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(binary_dir, root)
    shutil.copy(bomb, root / "train" / "circle" / "bomb.png")
    return str(root)


def test_prepare_skips_the_bomb_and_reports_its_path(binary_dir, bombs, tmp_path):
    data_dir = _folder_with_a_bomb(binary_dir, bombs[BOMB], tmp_path)
    result = prepare_lib.prepare(data_dir, str(tmp_path / "prepared"),
                                 prepare_lib.Options(min_shards=1, workers=1, progress=False))
    assert result.ok
    skipped = {entry["path"]: entry["reason"] for entry in result.report["skipped"]}
    assert "over --max_image_pixels=89,478,485" in skipped[f"{data_dir}/train/circle/bomb.png"]
    assert result.manifest["splits"]["train"]["count"] == 24  # The 24 real images, not 25.


def test_the_raw_folder_check_skips_the_bomb_by_path(binary_dir, bombs, tmp_path):
    data_dir = _folder_with_a_bomb(binary_dir, bombs[BOMB], tmp_path)
    info = pipeline.describe(data_dir)
    report = tmp_path / "report.json"
    screened = screen.screen(info, data_dir, str(report), str(tmp_path / "converted"),
                             max_pixels=10_000_000)
    assert screened.splits["train"].count == info.splits["train"].count - 1 == 24
    (entry,) = json.loads(report.read_text())["skipped"]
    assert entry["path"] == f"{data_dir}/train/circle/bomb.png"
    assert "over --max_image_pixels=10,000,000" in entry["reason"]


def test_predict_refuses_the_bomb_and_predicts_the_rest(finished_job, bombs, binary_dir):
    config, _ = finished_job
    good = f"{binary_dir}/test/circle/" + sorted(os.listdir(f"{binary_dir}/test/circle"))[0]
    results = list(predict.predict_files(config.model_dir, [bombs[BOMB], good]))
    assert "over --max_image_pixels=89,478,485" in results[0]["error"]
    assert "label" in results[1]


# ----------------------------------------------------------------- Damaged shards


@pytest.fixture
def prepared(binary_dir, tmp_path):
    """binary_dir prepared into one shard per split: (folder, manifest)."""
    result = prepare_lib.prepare(binary_dir, str(tmp_path / "prepared"),
                                 prepare_lib.Options(min_shards=1, workers=1, progress=False))
    return str(tmp_path / "prepared"), result.manifest


def _train_shard(folder, manifest):
    return f"{folder}/{manifest['splits']['train']['shards'][0]}"


def test_a_missing_shard_is_named_before_training(prepared):
    folder, manifest = prepared
    os.remove(_train_shard(folder, manifest))
    with pytest.raises(pipeline.DataError, match=rf"{_train_shard(folder, manifest)}: missing "
                                                 rf"\(listed in {folder}/manifest.json\)"):
        pipeline.describe(folder)


def test_a_truncated_shard_is_named_before_training_and_prepare_rewrites_it(prepared,
                                                                          binary_dir):
    folder, manifest = prepared
    shard = _train_shard(folder, manifest)
    size = os.path.getsize(shard)
    assert manifest["splits"]["train"]["shard_sizes"][
        manifest["splits"]["train"]["shards"][0]] == size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(pipeline.DataError,
                       match=rf"{shard}: {size - 100} bytes, the manifest records {size}"):
        pipeline.describe(folder)
    again = prepare_lib.prepare(binary_dir, folder,
                                prepare_lib.Options(min_shards=1, workers=1, progress=False))
    assert not again.up_to_date and os.path.getsize(shard) == size
    pipeline.describe(folder)


def test_a_corrupt_shard_is_named_when_read(prepared, tmp_path):
    folder, manifest = prepared
    shard = _train_shard(folder, manifest)
    hostile_files.flip_byte(shard)
    pipeline.describe(folder)  # Same size: nothing to see before reading.
    config = tiny_config(folder, tmp_path / "job", backbone="demo_cnn", fine_tune_at=5,
                         augment=False)
    with pytest.raises(pipeline.DataError, match=rf"Corrupt TFRecord shard\(s\) in {folder}: "
                                                 rf"{shard}: corrupted record at \d+"):
        train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    assert not os.path.exists(f"{config.job_dir}/model")
