"""trainer/data/sources.py: every accepted layout, alias and import format, bad rows, junk files.

On generated 32-px images. The trainer's listing (``pipeline.describe``) and
prepare's (``prepare.list_input``) come from the same function, and the
tests check that they agree image for image, locally and on gs:// through
the Cloud Storage emulator.
"""

import json
import os
import random
import shutil

import pytest
import tensorflow as tf

from trainer.data import demo as demo_data
from trainer.data import pipeline
from trainer.data import prepare as prepare_lib
from trainer.data import records
from trainer.data import sources

CLASSES = ("circle", "square")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train 10 / validation 5 / test 3 per class, as train/, validation/, test/."""
    root = str(tmp_path_factory.mktemp("sources") / "images")
    return demo_data.write_dataset(root, CLASSES, {"train": 10, "validation": 5, "test": 3},
                                   size=32, seed=7)


def _copy_as(folders, tmp_path, names):
    """folders with its split folders renamed: {'train': 'training', ...}."""
    root = tmp_path / "renamed"
    for split, name in names.items():
        shutil.copytree(os.path.join(folders, split), root / name)
    return str(root)


def _relative_splits(info, root):
    """{split: [(path relative to its split folder, label)]}: comparable across renames."""
    return {name: [("/".join(p.split("/")[-2:]), y) for p, y in zip(s.paths, s.labels)]
            for name, s in info.splits.items()}


@pytest.mark.parametrize("names", [
    {"train": "train", "validation": "val"},
    {"train": "training", "validation": "valid", "test": "testing"},
    {"train": "Train", "validation": "Validation", "test": "Test"},
])
def test_split_folder_aliases_list_like_the_canonical_names(folders, tmp_path, names):
    canonical = pipeline.describe(folders)
    renamed = pipeline.describe(_copy_as(folders, tmp_path, names))
    if "test" in names:
        assert _relative_splits(renamed, "") == _relative_splits(canonical, "")
    else:  # No test folder: a fifth of validation is held out, per class.
        assert renamed.splits["train"].count == 20
        assert renamed.splits["validation"].count + renamed.splits["test"].count == 10
    alias = names["validation"]
    assert (f"{alias}/ (alias of validation)" in renamed.listing.summary) == (alias != "validation")


def test_two_folders_for_one_split_is_an_error_naming_both(folders, tmp_path):
    root = _copy_as(folders, tmp_path, {"train": "train", "validation": "val"})
    shutil.copytree(os.path.join(folders, "validation"), os.path.join(root, "validation"))
    with pytest.raises(sources.DataError, match=r"both val/ and validation/"):
        pipeline.describe(root)


def test_train_without_validation_is_an_error(folders, tmp_path):
    root = _copy_as(folders, tmp_path, {"train": "train"})
    with pytest.raises(sources.DataError, match="no validation folder"):
        pipeline.describe(root)


def _class_root(folders, tmp_path, per_class=None):
    """Class folders only: every image of every split of ``folders``, by class."""
    root = tmp_path / "classes"
    for class_name in CLASSES:
        (root / class_name).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            for name in sorted(os.listdir(os.path.join(folders, split, class_name))):
                shutil.copy(os.path.join(folders, split, class_name, name),
                            root / class_name / f"{split}_{name}")
    return str(root)


def test_class_folders_only_split_80_10_10_per_class_by_seed(folders, tmp_path):
    root = _class_root(folders, tmp_path)  # 18 per class
    info = pipeline.describe(root, seed=1)
    for name, per_class in (("train", 14), ("validation", 2), ("test", 2)):
        assert [info.splits[name].labels.count(k) for k in (0, 1)] == [per_class] * 2, name
    assert "split 80/10/10 per class by seed 1" in info.listing.summary
    assert pipeline.describe(root, seed=1).splits == info.splits
    assert pipeline.describe(root, seed=2).splits["test"] != info.splits["test"]
    custom = pipeline.describe(root, split_fractions=(0.5, 0.25, 0.25))
    assert custom.splits["test"].count == 2 * round(18 * 0.25)


def _prepared_sources(output_dir):
    """{split: sorted source paths} of prepared records."""
    manifest = records.read_manifest(output_dir)
    result = {}
    for name, split_info in manifest["splits"].items():
        shards = [f"{output_dir}/{s}" for s in split_info["shards"]]
        result[name] = sorted(records.parse_all(r)[records.SOURCE].numpy().decode()
                              for r in tf.data.TFRecordDataset(shards))
    return result


def _trainer_sources(info, root):
    return {name: sorted(p[len(root.rstrip("/")) + 1:] for p in split.paths)
            for name, split in info.splits.items() if split.count}


@pytest.mark.parametrize("layout", ["class_folders", "aliased_splits"])
def test_prepare_and_trainer_split_image_for_image(folders, tmp_path, layout):
    root = (_class_root(folders, tmp_path) if layout == "class_folders" else
            _copy_as(folders, tmp_path, {"train": "training", "validation": "val"}))
    options = prepare_lib.Options(min_shards=1, workers=1, progress=False, seed=3)
    result = prepare_lib.prepare(root, str(tmp_path / "prepared"), options)
    assert result.ok, result.errors
    trainer_info = pipeline.describe(root, seed=3)
    assert _prepared_sources(str(tmp_path / "prepared")) == _trainer_sources(trainer_info, root)


def test_nested_class_folders_are_an_error_unless_flattened(folders, tmp_path):
    root = _copy_as(folders, tmp_path, {"train": "train", "validation": "validation"})
    nested = os.path.join(root, "train", "circle", "more")
    os.makedirs(nested)
    shutil.copy(os.path.join(root, "train", "circle", "0000.jpg"), os.path.join(nested, "x.jpg"))
    with pytest.raises(sources.DataError, match=r"train/circle holds folders \(more\)"):
        pipeline.describe(root)
    info = pipeline.describe(root, flatten_nested=True)
    assert f"{nested}/x.jpg" in info.splits["train"].paths


def test_os_droppings_and_hidden_files_are_ignored_quietly(folders, tmp_path):
    root = _copy_as(folders, tmp_path, {"train": "train", "validation": "validation"})
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._0000.jpg", ".hidden.jpg"):
        for folder in (root, os.path.join(root, "train", "circle")):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"\x00junk")
    os.makedirs(os.path.join(root, "__MACOSX", "train"))
    info = pipeline.describe(root)
    listed = {p for s in info.splits.values() for p in s.paths}
    assert not [p for p in listed if os.path.basename(p).startswith(".")
                or os.path.basename(p) in ("Thumbs.db", "desktop.ini")]
    assert info.listing.stray == ()  # Not even reported.
    assert info.splits["train"].count == 20


# ------------------------------------------------------------- Import files


def _rows(folders):
    """(ml_use, absolute path, label) of train and validation images of ``folders``."""
    info = pipeline.describe(folders, test_fraction=0.0)
    return [(ml_use, os.path.abspath(p), CLASSES[y]) for name, ml_use in
            (("train", "training"), ("validation", "validation"))
            for p, y in zip(info.splits[name].paths, info.splits[name].labels)]


def _write_csv(path, rows):
    with open(path, "w") as f:
        f.writelines(",".join(row) + "\n" for row in rows)
    return str(path)


def _jsonl_line(uri, label, ml_use=None, multi=None):
    item = {"imageGcsUri": uri}
    if multi:
        item["classificationAnnotations"] = [{"displayName": m} for m in multi]
    else:
        item["classificationAnnotation"] = {"displayName": label}
    if ml_use:
        item["dataItemResourceLabels"] = {"aiplatform.googleapis.com/ml_use": ml_use}
    return json.dumps(item) + "\n"


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(_jsonl_line(p, label, ml_use) for ml_use, p, label in rows)
    return str(path)


@pytest.fixture
def two_splits(folders, tmp_path):
    """folders without test/: what the import files below describe."""
    return _copy_as(folders, tmp_path, {"train": "train", "validation": "validation"})


def test_csv_and_jsonl_of_the_same_images_give_the_folders_splits(two_splits, tmp_path):
    rows = _rows(two_splits)
    random.Random(0).shuffle(rows)  # Any row order: splits follow the images alone.
    from_folders = pipeline.describe(two_splits)
    csv_info = pipeline.describe(_write_csv(tmp_path / "a.csv", rows))
    jsonl_info = pipeline.describe(_write_jsonl(tmp_path / "a.jsonl", rows))
    assert csv_info.splits == from_folders.splits
    assert jsonl_info.splits == from_folders.splits
    assert csv_info.class_names == jsonl_info.class_names == CLASSES
    assert "import file (CSV)" in csv_info.listing.summary


def test_relative_paths_any_case_ml_use_and_several_files(two_splits, tmp_path):
    rows = _rows(two_splits)
    relative = [(ml_use.upper(), os.path.relpath(p, two_splits), label)
                for ml_use, p, label in rows]
    half = len(relative) // 2
    first = _write_csv(os.path.join(two_splits, "first.csv"), relative[:half])
    second = _write_jsonl(os.path.join(two_splits, "second.jsonl"), relative[half:])
    info = pipeline.describe(f"{first},{second}")
    assert info.splits == pipeline.describe(two_splits).splits


def test_unassigned_rows_are_split_per_class_like_class_folders(folders, tmp_path):
    root = _class_root(folders, tmp_path)
    rows = [(os.path.join(root, c, n), c) for c in CLASSES for n in sorted(os.listdir(
        os.path.join(root, c)))]
    without = _write_csv(tmp_path / "no_ml_use.csv", rows)
    unassigned = _write_csv(tmp_path / "unassigned.csv", [("UNASSIGNED", *r) for r in rows])
    as_folders = pipeline.describe(root, seed=5)
    assert pipeline.describe(without, seed=5).splits == as_folders.splits
    assert pipeline.describe(unassigned, seed=5).splits == as_folders.splits


def _bad_rows_csv(two_splits, tmp_path):
    good = [(m, os.path.abspath(p), label) for m, p, label in _rows(two_splits)]
    lines = [",".join(r) for r in good]
    lines += [
        f"training,{two_splits}/train/circle/missing.jpg,circle",  # missing file
        f"training,{two_splits}/train/circle/0000.jpg,",  # empty label
        f"sometimes,{two_splits}/train/square/0001.jpg,square",  # unknown ML_USE
        f"validation,{two_splits}/train/circle/0002.jpg,square",  # conflicts with its row
        f"validation,{two_splits}/train/square/0003.jpg,triangle",  # conflicts too
        f"test,{two_splits}/train/circle/0001.jpg,circle",  # same label again: kept once
    ]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path), len(good)


def test_every_bad_row_is_reported_with_its_line_and_skipped(two_splits, tmp_path):
    path, n = _bad_rows_csv(two_splits, tmp_path)
    info = pipeline.describe(path)
    reasons = {p.where: p.reason for p in info.listing.bad_rows}
    conflict_circle = [w for w, r in reasons.items() if "0002.jpg has conflicting" in r]
    assert reasons[f"{path}:{n + 1}"].startswith("missing file")
    assert reasons[f"{path}:{n + 2}"] == "empty label"
    assert reasons[f"{path}:{n + 3}"].startswith("unknown ML_USE 'sometimes'")
    assert f"{path}:{n + 4}" in conflict_circle and len(conflict_circle) == 2
    assert "triangle" in reasons[f"{path}:{n + 5}"]
    assert f"{path}:{n + 6}" not in reasons
    listed = {p for s in info.splits.values() for p in s.paths}
    assert f"{two_splits}/train/circle/0002.jpg" not in listed  # Both its rows dropped.
    assert f"{two_splits}/train/circle/0001.jpg" in info.splits["train"].paths  # First kept.
    assert "7 bad rows skipped" in info.listing.summary


def test_a_label_without_training_image_is_a_bad_row(two_splits, tmp_path):
    star = os.path.join(two_splits, "star.jpg")
    shutil.copy(os.path.join(two_splits, "validation", "circle", "0000.jpg"), star)
    path = _write_csv(tmp_path / "star.csv", _rows(two_splits) + [("validation", star, "star")])
    info = pipeline.describe(path)
    assert [(p.where, p.reason) for p in info.listing.bad_rows] == [
        (f"{path}:{len(_rows(two_splits)) + 1}", "label 'star' has no training image")]
    assert info.class_names == CLASSES


def test_strict_fails_on_the_first_bad_row(two_splits, tmp_path):
    path, _ = _bad_rows_csv(two_splits, tmp_path)
    # The first bad row by line: row 3 (circle/0002.jpg) conflicts with a later one.
    with pytest.raises(sources.DataError, match=r"bad.csv:3: \S+0002.jpg has conflicting"):
        pipeline.describe(path, strict=True)
    with pytest.raises(prepare_lib.PrepareError, match=r"bad.csv:3:"):
        prepare_lib.prepare(path, str(tmp_path / "out"),
                            prepare_lib.Options(strict=True, progress=False))


def test_bad_json_lines_are_reported_with_their_line(two_splits, tmp_path):
    rows = _rows(two_splits)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(_jsonl_line(p, label, m) for m, p, label in rows)
                    + "{not json\n" + json.dumps({"no": "uri"}) + "\n")
    info = pipeline.describe(str(path))
    assert [(p.where, p.reason.split(":")[0]) for p in info.listing.bad_rows] == [
        (f"{path}:{len(rows) + 1}", "not JSON"), (f"{path}:{len(rows) + 2}", "no imageGcsUri")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_row_with_several_labels_lists_every_label(two_splits, tmp_path, fmt):
    """CSV ``ML_USE,PATH,LABEL,LABEL`` and JSONL ``classificationAnnotations`` lists: the
    image keeps every label (its first as class_name), and the listing is multi-label."""
    rows = _rows(two_splits)
    (ml_use, first, _), rest = rows[0], rows[1:]
    path = tmp_path / f"multi.{fmt}"
    if fmt == "csv":
        path.write_text(f"{ml_use},{first},square,circle,square\n"
                        + "".join(",".join(r) + "\n" for r in rest))
    else:
        path.write_text(_jsonl_line(first, None, ml_use, multi=["square", "circle", "square"])
                        + "".join(_jsonl_line(p, label, m) for m, p, label in rest))
    info = pipeline.describe(str(path), test_fraction=0.0)
    assert info.has_multi_label
    [image] = [i for i in info.listing.images if i.path == first]
    assert image.all_labels == ("square", "circle") and image.class_name == "square"
    train = info.splits["train"]
    index = train.paths.index(first)
    assert train.label_sets[index] == (CLASSES.index("square"), CLASSES.index("circle"))
    assert all(len(s) == 1 for k, s in enumerate(train.label_sets) if k != index)


def test_prepare_reads_an_import_file_into_the_trainers_splits(two_splits, tmp_path):
    path, _ = _bad_rows_csv(two_splits, tmp_path)
    result = prepare_lib.prepare(path, str(tmp_path / "prepared"),
                                 prepare_lib.Options(min_shards=1, workers=1, progress=False))
    assert result.ok, result.errors
    assert len(result.report["bad_rows"]) == 7
    trainer_info = pipeline.describe(path)
    prepared = _prepared_sources(str(tmp_path / "prepared"))
    assert prepared == {name: sorted(s.paths) for name, s in trainer_info.splits.items()}


# ------------------------------------------------------------------- gs://


def _upload(local_root, gcs_root):
    for directory, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(directory, name)
            tf.io.gfile.makedirs(f"{gcs_root}/{os.path.relpath(directory, local_root)}")
            tf.io.gfile.copy(path, f"{gcs_root}/{os.path.relpath(path, local_root)}",
                             overwrite=True)


def test_gcs_folders_and_import_files_list_as_locally(two_splits, gcs_dir, tmp_path):
    rows = [(m, os.path.relpath(p, two_splits), label) for m, p, label in _rows(two_splits)]
    _write_csv(os.path.join(two_splits, "relative.csv"), rows[:-1] + [
        ("training", "train/circle/missing.jpg", "circle")])
    _write_jsonl(os.path.join(two_splits, "absolute.jsonl"),
                 [(m, f"{gcs_dir}/{p}", label) for m, p, label in rows])
    _upload(two_splits, gcs_dir)
    local = _trainer_sources(pipeline.describe(two_splits), two_splits)
    assert _trainer_sources(pipeline.describe(gcs_dir), gcs_dir) == local
    assert _trainer_sources(pipeline.describe(f"{gcs_dir}/absolute.jsonl"), gcs_dir) == local
    csv_info = pipeline.describe(f"{gcs_dir}/relative.csv")
    assert [p.reason for p in csv_info.listing.bad_rows] == [
        f"missing file {gcs_dir}/train/circle/missing.jpg"]
    result = prepare_lib.prepare(f"{gcs_dir}/absolute.jsonl", f"{gcs_dir}/prepared",
                                 prepare_lib.Options(min_shards=1, workers=2, progress=False))
    assert result.ok, result.errors
    assert {k: sorted(p[len(gcs_dir) + 1:] for p in v) for k, v in
            _prepared_sources(f"{gcs_dir}/prepared").items()} == local
