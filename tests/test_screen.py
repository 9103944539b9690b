"""trainer/data/screen.py: junk and broken files before training; conversions as prepare's.

Generated 32-px images plus one planted file of each junk kind (non-images by
content whatever their name, truncated and empty files) and of each format
prepare converts (PNG with alpha, animated GIF, palette BMP, grayscale and
CMYK JPEG). The raw-folder path must drop the first kind, reporting each by
path, and must feed the second kind to the model exactly as prepare's
records do.
"""

import hashlib
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import tensorflow as tf

from trainer import cluster
from trainer import train
from trainer.data import demo as demo_data
from trainer.data import images
from trainer.data import pipeline
from trainer.data import prepare as prepare_lib
from trainer.data import records
from trainer.data import screen
from trainer.data import screen_memo

JUNK = {  # name in train/circle -> a word of the reason it is skipped
    "README.txt": "not an image",
    "fake.jpg": "not an image",  # Text named .jpg: judged by content.
    "empty.png": "zero-byte",
    "truncated.jpg": "truncated",
}
CONVERTED = ("alpha.png", "animation.gif", "palette.bmp", "gray.jpg", "cmyk.jpg")


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _shape(seed):
    return demo_data.draw_image("square", 32, random.Random(seed))


@pytest.fixture(scope="module")
def messy(binary_dir, tmp_path_factory):
    """binary_dir's train/validation, plus JUNK and CONVERTED files in train/circle."""
    root = tmp_path_factory.mktemp("messy_raw") / "images"
    for split in ("train", "validation"):
        shutil.copytree(os.path.join(binary_dir, split), root / split)
    good = _encode(demo_data.draw_image("square", 128, random.Random(0)), "JPEG", quality=95)
    frames = [_shape(i).convert("P") for i in range(3)]
    contents = {
        "README.txt": b"Images of circles and squares.\n",
        "fake.jpg": b"<html>not found</html>",
        "empty.png": b"",
        "truncated.jpg": good[: len(good) // 2],
        "alpha.png": _encode(_shape(1).convert("RGBA"), "PNG"),
        "animation.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "palette.bmp": _encode(_shape(2).convert("P"), "BMP"),
        "gray.jpg": _encode(_shape(3).convert("L"), "JPEG"),
        "cmyk.jpg": _encode(_shape(4).convert("CMYK"), "JPEG"),
    }
    for name, data in contents.items():
        (root / "train" / "circle" / name).write_bytes(data)
    return str(root)


def test_junk_is_skipped_and_reported_by_path(messy, tmp_path):
    info = pipeline.describe(messy)
    report_path = str(tmp_path / "job" / screen.REPORT)
    screened = screen.screen(info, messy, report_path, str(tmp_path / "converted"))
    with open(report_path) as f:
        report = json.load(f)
    skipped = {os.path.basename(e["path"]): e["reason"] for e in report["skipped"]}
    assert set(skipped) == set(JUNK)
    for name, word in JUNK.items():
        assert word in skipped[name], (name, skipped[name])
        assert f"{messy}/train/circle/{name}" not in screened.splits["train"].paths
    assert {os.path.basename(e["path"]) for e in report["converted"]} == set(CONVERTED)
    assert screened.splits["train"].count == info.splits["train"].count - len(JUNK)
    assert report["counts"]["train"] == screened.splits["train"].count
    assert report["check_seconds"] >= 0 and report["summary"]["files"] == sum(
        s.count for s in info.splits.values())


def _pixels(encoded, size=32):
    return pipeline.preprocess_image(tf.constant(encoded), size).numpy()


def test_converted_images_feed_the_pixels_of_prepares_records(messy, tmp_path):
    info = pipeline.describe(messy)
    screened = screen.screen(info, messy, "", str(tmp_path / "converted"))
    kept = [p for p in info.splits["train"].paths if os.path.basename(p) not in JUNK]
    reads = dict(zip(kept, screened.splits["train"].paths))  # Order kept, junk dropped.
    result = prepare_lib.prepare(messy, str(tmp_path / "prepared"),
                                 prepare_lib.Options(min_shards=1, workers=2, progress=False))
    assert result.ok
    manifest = records.read_manifest(str(tmp_path / "prepared"))
    shards = [f"{tmp_path}/prepared/{s}" for s in manifest["splits"]["train"]["shards"]]
    stored = {os.path.basename(e[records.SOURCE].numpy().decode()): e[records.ENCODED].numpy()
              for e in map(records.parse_all, tf.data.TFRecordDataset(shards))}
    for name in CONVERTED:
        read = reads[f"{messy}/train/circle/{name}"]
        assert read != f"{messy}/train/circle/{name}", name  # A converted copy.
        with open(read, "rb") as f:
            np.testing.assert_array_equal(_pixels(f.read()), _pixels(stored[name]), err_msg=name)
    # Why the copies: TensorFlow's own decoder gives a palette BMP other colours.
    with open(f"{messy}/train/circle/palette.bmp", "rb") as f:
        raw = _pixels(f.read())
    assert np.abs(raw.astype(int) - _pixels(stored["palette.bmp"]).astype(int)).max() > 50


def test_a_training_job_on_a_messy_folder_trains_and_reports(messy, make_config):
    config = make_config(messy, backbone="demo_cnn", fine_tune_at=5, fine_tune_epochs=0)
    metrics = train.train_and_evaluate(config, cluster.create_strategy("one_device"))
    with open(f"{config.job_dir}/{screen.REPORT}") as f:
        report = json.load(f)
    assert {os.path.basename(e["path"]) for e in report["skipped"]} == set(JUNK)
    assert report["layout"] == "splits" and report["summary_line"].startswith("layout: split")
    assert metrics["validation"]["count"] == 10  # 6 per class, a fifth held out as test.


def test_records_pass_through_unchanged(binary_dir, tmp_path):
    prepare_lib.prepare(binary_dir, str(tmp_path / "p"),
                        prepare_lib.Options(min_shards=1, workers=1, progress=False))
    info = pipeline.describe(str(tmp_path / "p"))
    assert screen.screen(info, str(tmp_path / "p"), str(tmp_path / "r.json")) is info
    assert not (tmp_path / "r.json").exists()


def test_a_memo_skips_decoding_only_files_found_usable_before(messy, tmp_path, monkeypatch):
    """With --cache_dir, a rerun decodes only files not known usable by content: bad files
    are reported every time, and a usable file edited since is judged afresh."""
    data = shutil.copytree(messy, tmp_path / "data")
    decoded = []
    check = images.check_image
    monkeypatch.setattr(images, "check_image",
                        lambda content, **kw: decoded.append(content) or check(content, **kw))
    converted, memo = str(tmp_path / "converted"), str(tmp_path / "cache")

    def run(name):
        decoded.clear()
        screened = screen.screen(pipeline.describe(str(data)), str(data),
                                 str(tmp_path / name), converted, memo_dir=memo)
        with open(tmp_path / name) as f:
            return screened, json.load(f)

    first, report = run("first.json")
    files = report["summary"]["files"]
    assert len(decoded) == files and report["summary"]["known_usable"] == 0
    (memo_file,) = (tmp_path / "cache" / screen_memo.FOLDER).iterdir()
    usable = files - len(JUNK) - len(CONVERTED)
    assert 0 < memo_file.stat().st_size - 68 * usable < 200  # README: 68 bytes per image.
    second, report = run("second.json")
    assert len(decoded) == len(JUNK) + len(CONVERTED)  # Only what was not usable as it is.
    assert report["summary"]["known_usable"] == files - len(JUNK) - len(CONVERTED)
    assert {os.path.basename(e["path"]) for e in report["skipped"]} == set(JUNK)
    assert {os.path.basename(e["path"]) for e in report["converted"]} == set(CONVERTED)
    assert second.splits == first.splits
    for path, digest in second.splits["train"].digests:  # What training reads, by content.
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == digest
    # A usable file cut short since: its bytes are not the remembered ones.
    square = data / "train" / "square"
    victim = sorted(square.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    third, report = run("third.json")
    assert str(victim) in {e["path"] for e in report["skipped"]}
    assert str(victim) not in third.splits["train"].paths
