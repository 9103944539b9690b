"""trainer.prepare: bad files, conversions, records, manifest, idempotence, worker shards.

Runs the real command (flags parsed into a fresh FlagValues, one run in a
real process for its exit status) on generated 32-px folders that hold one
file of each bad kind, then reads the shards back with tf.data.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from trainer import prepare as prepare_cli
from trainer.data import demo as demo_data
from trainer.data import pipeline
from trainer.data import records

# What each planted file becomes: (status, a word its reason must contain).
BAD_FILES = {
    "train/circle/corrupt.jpg": ("skipped", "corrupt"),
    "train/circle/truncated.jpg": ("skipped", "truncated"),
    "train/circle/empty.jpg": ("skipped", "zero-byte"),
    "train/circle/notes.txt": ("skipped", "not an image"),
    "train/circle/image.png": ("converted", "PNG"),
    "train/circle/animation.gif": ("converted", "first of 3 frames"),
    "train/circle/image.bmp": ("converted", "BMP"),
    "train/square/gray.jpg": ("converted", "grayscale"),
    "train/square/cmyk.jpg": ("converted", "CMYK"),
    "train/square/big.jpg": ("converted", "downscaled 64x48 to 40x30"),
    "demo.json": ("skipped", "not in a class folder"),
}
MAX_SIDE = 40


def _encode(image: Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def _shape_image(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    import random

    return demo_data.draw_image("circle", max(width, height), random.Random(seed)).resize(
        (width, height))


def plant_bad_files(root: str) -> None:
    """Adds one file of each kind of BAD_FILES (and a cross-split duplicate) to ``root``."""
    good = _encode(_shape_image(0), "JPEG", quality=90)
    frames = [_shape_image(i).convert("P") for i in range(3)]
    contents = {
        "train/circle/corrupt.jpg": good[:300] + bytes(range(256)) * 4,
        "train/circle/truncated.jpg": good[: len(good) // 2],
        "train/circle/empty.jpg": b"",
        "train/circle/notes.txt": b"not an image\n",
        "train/circle/image.png": _encode(_shape_image(1).convert("RGBA"), "PNG"),
        "train/circle/animation.gif": _encode(frames[0], "GIF", save_all=True,
                                              append_images=frames[1:]),
        "train/circle/image.bmp": _encode(_shape_image(2), "BMP"),
        "train/square/gray.jpg": _encode(_shape_image(3).convert("L"), "JPEG"),
        "train/square/cmyk.jpg": _encode(_shape_image(4).convert("CMYK"), "JPEG"),
        "train/square/big.jpg": _encode(_shape_image(5, 64, 48), "JPEG", quality=95),
    }
    for relative, data in contents.items():
        with open(os.path.join(root, relative), "wb") as f:
            f.write(data)
    # The same bytes in train and validation: leakage.
    shutil.copy(os.path.join(root, "validation/square/0000.jpg"),
                os.path.join(root, "train/square/leaked.jpg"))


def run_prepare(input_dir, output_dir, *extra) -> int:
    """trainer.prepare's exit status for these arguments, run in this process."""
    flag_values = flags.FlagValues()
    prepare_cli.define_flags(flag_values)
    flag_values(["trainer.prepare", f"--input_dir={input_dir}", f"--output_dir={output_dir}",
                 "--workers=2", "--noprogress", *extra])
    return prepare_cli.run(flag_values)


def read_records(output_dir, split=None):
    """Every record of the prepared folder (or one split) as a dict of numpy values."""
    manifest = records.read_manifest(output_dir)
    shards = [f"{output_dir}/{shard}" for name, info in manifest["splits"].items()
              if split in (None, name) for shard in info["shards"]]
    return [{k: v.numpy() for k, v in records.parse_all(r).items()}
            for r in tf.data.TFRecordDataset(shards)]


def snapshot(folder):
    """{relative path: (size, mtime_ns, sha256)} of every file below ``folder``."""
    result = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            stat = os.stat(path)
            result[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, digest)
    return result


@pytest.fixture(scope="module")
def messy_dir(binary_dir, tmp_path_factory):
    """binary_dir (2 classes; train 12, validation 6, test 4 each) plus BAD_FILES."""
    root = str(tmp_path_factory.mktemp("messy") / "images")
    shutil.copytree(binary_dir, root)
    plant_bad_files(root)
    return root


@pytest.fixture(scope="module")
def prepared(messy_dir, tmp_path_factory):
    """messy_dir prepared with --max_side=40 --min_shards=4: (output_dir, exit status)."""
    output_dir = str(tmp_path_factory.mktemp("prepared") / "out")
    status = run_prepare(messy_dir, output_dir, f"--max_side={MAX_SIDE}", "--min_shards=4")
    return output_dir, status


def _report(output_dir):
    with open(os.path.join(output_dir, records.REPORT)) as f:
        return json.load(f)


# ------------------------------------------------------------ Bad files, report


def test_every_bad_file_is_skipped_or_converted_with_its_reason(messy_dir, prepared):
    output_dir, status = prepared
    assert status == 0
    report = _report(output_dir)
    found = {os.path.relpath(e["path"], messy_dir): ("skipped", e["reason"])
             for e in report["skipped"]}
    found.update({os.path.relpath(e["path"], messy_dir): ("converted", e["reason"])
                  for e in report["converted"]})
    assert set(found) == set(BAD_FILES)
    for relative, (status_wanted, word) in BAD_FILES.items():
        assert found[relative][0] == status_wanted, relative
        assert word in found[relative][1], (relative, found[relative][1])
    assert report["summary"]["written"] == 2 * (12 + 6 + 4) + 7  # 6 converted + leaked.jpg.
    assert report["errors"] == [] and report["empty_classes"] == {}


def test_identical_images_across_splits_are_reported_as_leakage(messy_dir, prepared):
    output_dir, _ = prepared
    (group,) = _report(output_dir)["leakage"]
    assert {(f["split"], os.path.relpath(f["path"], messy_dir)) for f in group["files"]} == {
        ("train", "train/square/leaked.jpg"), ("validation", "validation/square/0000.jpg")}


def test_records_hold_rgb_jpegs_with_the_schema_fields(messy_dir, prepared):
    output_dir, _ = prepared
    report = _report(output_dir)
    skipped = {os.path.relpath(e["path"], messy_dir) for e in report["skipped"]}
    converted = {os.path.relpath(e["path"], messy_dir) for e in report["converted"]}
    examples = read_records(output_dir)
    by_source = {e[records.SOURCE].decode(): e for e in examples}
    assert len(by_source) == len(examples) == report["summary"]["written"]
    assert not skipped & set(by_source)
    class_names = ("circle", "square")
    for source, example in by_source.items():
        with open(os.path.join(messy_dir, source), "rb") as f:
            original = f.read()
        assert example[records.HASH].decode() == hashlib.sha256(original).hexdigest()
        assert example[records.FORMAT] == b"jpeg"
        assert class_names[example[records.LABEL]] == example[records.CLASS_NAME].decode()
        assert example[records.CLASS_NAME].decode() == source.split("/")[1]
        image = tf.io.decode_jpeg(example[records.ENCODED]).numpy()
        assert image.shape == (example[records.HEIGHT], example[records.WIDTH], 3)
        assert max(image.shape[:2]) <= MAX_SIDE
        if source not in converted:
            assert example[records.ENCODED] == original  # RGB JPEGs are stored unchanged.
    assert by_source["train/square/big.jpg"][records.WIDTH] == 40


# ------------------------------------------------------------------ Round trip


def test_decoded_record_matches_pillow_within_jpeg_tolerance(messy_dir, prepared):
    output_dir, _ = prepared
    by_source = {e[records.SOURCE].decode(): e for e in read_records(output_dir, "train")}
    # (source, mean and max absolute difference allowed, in 0-255 levels). A
    # JPEG stored as is differs only by the decoders' IDCTs (TF's default is
    # the fast integer one); a converted image also by one q95 encode of a
    # noisy 32-px picture.
    for source, mean_tolerance, max_tolerance in [("train/circle/0000.jpg", 2, 12),
                                                  ("train/circle/image.png", 5, 48),
                                                  ("train/circle/image.bmp", 5, 48),
                                                  ("train/square/cmyk.jpg", 5, 48)]:
        decoded = tf.io.decode_image(by_source[source][records.ENCODED], channels=3).numpy()
        expected = np.asarray(Image.open(os.path.join(messy_dir, source)).convert("RGB"))
        difference = np.abs(decoded.astype(int) - expected.astype(int))
        assert difference.mean() <= mean_tolerance, (source, difference.mean())
        assert difference.max() <= max_tolerance, (source, difference.max())


def _jpeg_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_large_jpegs_decode_at_a_reduced_scale_that_averages_pixels():
    assert [int(pipeline.jpeg_scale(h, w, 64)) for h, w in
            [(63, 500), (64, 64), (127, 900), (128, 130), (256, 300), (512, 768), (4000, 3000)]
            ] == [0, 0, 0, 1, 2, 3, 3]
    # Two-pixel stripes, 12x larger than the output: a full decode with
    # bilinear resizing samples stripes, a 1/8-scale decode averages them.
    x = np.arange(768)[np.newaxis, :].repeat(512, axis=0)
    stripes = np.where((x // 2) % 2 == 0, 230, 30).astype(np.uint8)
    pixels = np.stack([stripes, stripes, np.full_like(stripes, 128)], axis=-1)
    encoded = tf.constant(_jpeg_bytes(pixels))
    area_average = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BOX), np.float32)
    ours = pipeline.decode_and_resize(encoded, 64).numpy()
    full_bilinear = tf.image.resize(tf.io.decode_jpeg(encoded, channels=3), [64, 64]).numpy()
    assert ours.shape == (64, 64, 3)
    assert np.abs(ours - area_average).mean() < 1.5
    assert np.abs(full_bilinear - area_average).mean() > 4


def test_small_jpegs_and_other_formats_decode_at_full_scale():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    for encoded in (_jpeg_bytes(pixels), png.getvalue()):
        decoded = tf.io.decode_image(encoded, channels=3)
        expected = tf.image.resize(decoded, [32, 32]).numpy()
        np.testing.assert_allclose(pipeline.decode_and_resize(tf.constant(encoded), 32).numpy(),
                                   expected, atol=1e-3)


def test_preprocessing_is_the_same_eagerly_and_inside_tf_data(prepared):
    output_dir, _ = prepared
    info = pipeline.describe(output_dir)
    shard = info.splits["train"].shards[0]
    one_shard = pipeline.Split("train", -1, shards=(shard,))
    dataset = pipeline.make_dataset(one_shard, 24, batch_size=1, training=False,
                                    cache="none", deterministic=True)
    in_tf_data = [images[0].numpy() for images, _ in dataset]
    eager = [pipeline.preprocess_image(records.parse_example(r)[0], 24).numpy()
             for r in tf.data.TFRecordDataset([shard])]
    assert len(in_tf_data) == len(eager) > 0
    for a, b in zip(in_tf_data, eager):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------- Manifest


def test_manifest_lists_classes_counts_shards_and_sizes(prepared):
    output_dir, _ = prepared
    manifest = records.read_manifest(output_dir)
    assert manifest["format_version"] == records.FORMAT_VERSION
    assert manifest["class_names"] == ["circle", "square"]
    assert manifest["report"] == records.REPORT
    assert manifest["source"]["layout"] == "splits"
    for split, info in manifest["splits"].items():
        examples = read_records(output_dir, split)
        assert info["count"] == len(examples)
        counted = {name: sum(e[records.CLASS_NAME].decode() == name for e in examples)
                   for name in manifest["class_names"]}
        assert info["classes"] == counted
        assert len(info["shards"]) == min(4, info["count"])
        for shard in info["shards"]:
            assert shard.startswith(f"{split}/") and os.path.isfile(f"{output_dir}/{shard}")
    assert manifest["splits"]["test"]["classes"] == {"circle": 4, "square": 4}  # test/ kept.
    assert manifest["image_stats"]["width"]["max"] == MAX_SIDE
    assert manifest["image_stats"]["height"]["min"] == 30
    assert 0 < manifest["image_stats"]["encoded_bytes"]["mean"]
    info = pipeline.describe(output_dir)
    assert info.class_names == ("circle", "square")
    assert {name: split.count for name, split in info.splits.items()} == {
        name: split["count"] for name, split in manifest["splits"].items()}


# -------------------------------------------------------- Re-runs, interruption


def test_rerun_changes_nothing(messy_dir, prepared):
    output_dir, _ = prepared
    before = snapshot(output_dir)
    assert run_prepare(messy_dir, output_dir, f"--max_side={MAX_SIDE}", "--min_shards=4") == 0
    assert snapshot(output_dir) == before


def test_interrupted_run_reruns_cleanly(messy_dir, prepared, tmp_path):
    output_dir, _ = prepared
    interrupted = str(tmp_path / "out")
    shutil.copytree(output_dir, interrupted)
    # What a killed run leaves: no manifest (removed first, written last), a
    # half-written temporary shard and manifest, shards of an older plan.
    os.remove(os.path.join(interrupted, records.MANIFEST))
    leftovers = ["train/train-00001-of-00004.tfrecord.tmp-0123456789ab",
                 "train/train-00007-of-00009.tfrecord",
                 "manifest.json.tmp-0123456789ab"]
    for leftover in leftovers:
        with open(os.path.join(interrupted, leftover), "wb") as f:
            f.write(b"partial")
    with open(os.path.join(interrupted, "keep.txt"), "w") as f:
        f.write("not ours")

    assert run_prepare(messy_dir, interrupted, f"--max_side={MAX_SIDE}", "--min_shards=4") == 0
    for leftover in leftovers:
        assert not os.path.exists(os.path.join(interrupted, leftover))
    assert os.path.exists(os.path.join(interrupted, "keep.txt"))
    expected = {path: digest for path, (_, _, digest) in snapshot(output_dir).items()
                if path != records.REPORT}  # The report names its output folder.
    rerun = {path: digest for path, (_, _, digest) in snapshot(interrupted).items()
             if path not in (records.REPORT, "keep.txt")}
    assert rerun == expected


# ------------------------------------------------------------- Worker shards


def _elements(dataset):
    return [(labels[0].numpy(), hashlib.sha256(images[0].numpy().tobytes()).hexdigest())
            for images, labels in dataset]


@pytest.mark.parametrize("shards", [None, 1], ids=["file_level", "one_shard"])
def test_two_workers_read_disjoint_shares_that_together_are_complete(prepared, shards):
    output_dir, _ = prepared
    split = pipeline.describe(output_dir).splits["train"]
    if shards:  # Fewer files than workers: each worker keeps every other record.
        split = pipeline.Split("train", -1, shards=split.shards[:shards])
    everything = _elements(pipeline.make_dataset(split, 32, 1, training=False, cache="none"))
    shares = [_elements(pipeline.make_dataset(
        split, 32, 1, training=False, cache="none",
        input_context=tf.distribute.InputContext(2, worker, 2))) for worker in (0, 1)]
    assert all(shares)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)


def test_deterministic_mode_repeats_the_same_batches(prepared):
    output_dir, _ = prepared
    split = pipeline.describe(output_dir).splits["train"]

    def batches():
        dataset = pipeline.make_dataset(split, 32, 4, training=True, seed=7, shuffle_buffer=16,
                                        deterministic=True)
        return [labels.numpy().tolist() + [float(images.numpy().sum())]
                for images, labels in dataset.take(5)]

    assert batches() == batches()


# ----------------------------------------------------------- Layouts, sizes


def test_class_folders_alone_are_split_by_fraction_and_seed(binary_dir, tmp_path):
    flat = tmp_path / "flat"
    for class_name in ("circle", "square"):
        shutil.copytree(os.path.join(binary_dir, "train", class_name), flat / class_name)
    args = ("--split_fractions=0.75,0.17,0.08", "--min_shards=2")
    assert run_prepare(flat, tmp_path / "a", *args) == 0
    assert run_prepare(flat, tmp_path / "b", *args) == 0
    manifest = records.read_manifest(str(tmp_path / "a"))
    assert {name: info["classes"] for name, info in manifest["splits"].items()} == {
        "train": {"circle": 9, "square": 9},  # 12 per class: 3 to validation,
        "validation": {"circle": 2, "square": 2},  # 1 of those to test.
        "test": {"circle": 1, "square": 1}}
    sources = {split: {e[records.SOURCE] for e in read_records(str(tmp_path / "a"), split)}
               for split in manifest["splits"]}
    assert not (sources["train"] & sources["validation"] or sources["train"] & sources["test"])
    assert manifest == records.read_manifest(str(tmp_path / "b"))  # The same seed, the same split.


def test_shard_count_follows_target_bytes_and_min_shards(binary_dir, tmp_path):
    # ~1.1 KB images, 24 per split of train: a 4 KB target needs about 7 shards.
    assert run_prepare(binary_dir, tmp_path / "small", "--shard_mb=0.004", "--min_shards=2") == 0
    assert run_prepare(binary_dir, tmp_path / "min", "--min_shards=5") == 0
    small = records.read_manifest(str(tmp_path / "small"))["splits"]
    assert 5 <= len(small["train"]["shards"]) <= 10
    assert len(records.read_manifest(str(tmp_path / "min"))["splits"]["train"]["shards"]) == 5


# --------------------------------------------------------------- Failures


def test_an_empty_class_fails_with_a_report_and_no_manifest(binary_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(binary_dir, images)
    (images / "train" / "triangle").mkdir()
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", f"--input_dir={images}",
         f"--output_dir={output_dir}", "--noprogress"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 1, result.stderr[-2000:]
    report = _report(str(output_dir))
    assert "Class 'triangle' has no usable image in train." in report["errors"]
    assert report["empty_classes"]["train"] == ["triangle"]
    assert not (output_dir / records.MANIFEST).exists()
    assert "triangle" in result.stderr


def test_nothing_usable_fails(tmp_path):
    for class_name in ("a", "b"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        (tmp_path / "images" / class_name / "x.jpg").write_bytes(b"\xff\xd8 not really")
    assert run_prepare(tmp_path / "images", tmp_path / "out") == 1
    assert "No usable image in the input." in _report(str(tmp_path / "out"))["errors"]
