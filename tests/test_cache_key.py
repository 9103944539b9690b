"""The cache key: it changes with each input of the frozen output, and with nothing else.

Keys come from the real components (FrozenWork over a real model, real
image files, a real weights file); demo_cnn at 32 px keeps each one fast.
Flags that only change training are covered end to end in
tests/test_frozen_work.py (a second job with other training flags reads
the first one's entries).
"""

import dataclasses
import os
import shutil

import pytest
import tensorflow as tf
import tf_keras as keras

from trainer import cache_key
from trainer import cluster
from trainer import folding
from trainer import frozen_work
from trainer import model as model_lib
from trainer import tflite
from trainer.data import pipeline
from trainer.data import screen

BASE = dict(backbone="demo_cnn", image_size=32, fine_tune_at=5, seed=0, weights=None)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Two weights files of demo_cnn's backbone: random inits of seed 0 and seed 1."""
    folder = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (0, 1):
        model = model_lib.create_model("demo_cnn", 2, 32, 0.2, weights=None, seed=seed)
        paths.append(str(folder / f"seed{seed}.weights.h5"))
        model_lib.get_backbone(model).save_weights(paths[-1])
    return paths


_MODELS = {}


def _model(num_classes, image_size, dropout, weights, seed):
    """A demo_cnn classifier, built once per distinct set of arguments (and policy)."""
    args = (num_classes, image_size, dropout, weights, seed,
            keras.mixed_precision.global_policy().name)
    if args not in _MODELS:
        keras.utils.set_random_seed(seed)
        _MODELS[args] = model_lib.create_model("demo_cnn", num_classes, image_size, dropout,
                                               weights=weights, seed=seed)
    return _MODELS[args]


def _key(data_dir, kind="pooled", view="original", tmp="/tmp", **changes):
    values = {**BASE, **changes}
    info = pipeline.describe(data_dir)
    splits = [info.splits["train"], info.splits["validation"]]
    model = _model(info.num_classes, values["image_size"], values.get("dropout", 0.2),
                   values["weights"], values["seed"])
    work = frozen_work.FrozenWork(
        model, splits, tf.distribute.get_strategy(), cluster.ClusterInfo(), 4, 0,
        values["fine_tune_at"], True, True, 1e9, cache_dir=str(tmp), backbone=values["backbone"])
    return work.key(kind, view)


def _copy(source, target):
    shutil.copytree(source, target)
    return str(target)


def test_every_field_of_the_key_is_in_its_digest():
    key = cache_key.make_key("frontier", "original", "demo_cnn", "w", 32, 5,
                             {"train": "a", "validation": "b"})
    other = {"kind": "pooled", "view": "flipped", "backbone": "mobilenet_v2", "weights": "v",
             "image_size": 48, "fine_tune_at": 6, "dtype": "float16",
             "data": {"train": "c", "validation": "b"}, "folding": 2, "tensorflow": "0.0",
             "format": 0}
    assert set(other) == {f.name for f in dataclasses.fields(key)}
    for name, value in other.items():
        assert dataclasses.replace(key, **{name: value}).digest != key.digest, name


# Each input the key covers, changed through the real component that carries it.
CHANGES = {
    "backbone": dict(backbone="demo_cnn_v2"),  # The registry name, the same weights.
    "image_size": dict(image_size=48),
    "weights_random_init_seed": dict(seed=1),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_key_changes_with_model_inputs(binary_dir, tmp_path, name):
    for kind in ("pooled", "frontier"):
        assert (_key(binary_dir, kind, tmp=tmp_path).digest
                != _key(binary_dir, kind, tmp=tmp_path, **CHANGES[name]).digest)


def test_key_changes_with_the_weights_files_content_not_its_name(binary_dir, tmp_path,
                                                                 weights_files):
    first, second = weights_files
    renamed = str(tmp_path / "renamed.weights.h5")
    shutil.copy(first, renamed)
    # A weights file fixes the weights: the seed no longer matters.
    assert (_key(binary_dir, weights=first, seed=0).digest
            == _key(binary_dir, weights=renamed, seed=3).digest)
    assert (_key(binary_dir, weights=first).digest
            != _key(binary_dir, weights=second).digest)


def test_fine_tune_at_changes_the_frontier_key_only(binary_dir, tmp_path):
    assert (_key(binary_dir, "frontier").digest
            != _key(binary_dir, "frontier", fine_tune_at=6).digest)
    assert (_key(binary_dir, "pooled").digest
            == _key(binary_dir, "pooled", fine_tune_at=6).digest)


def test_flip_view_changes_the_key(binary_dir):
    assert (_key(binary_dir, "frontier", "original").digest
            != _key(binary_dir, "frontier", "flipped").digest)


def test_key_changes_with_one_images_content_and_label_not_the_folders_place(binary_dir,
                                                                               tmp_path):
    moved = _copy(binary_dir, tmp_path / "moved")
    assert _key(binary_dir).digest == _key(moved).digest
    edited = _copy(binary_dir, tmp_path / "edited")
    circle = os.path.join(edited, "train", "circle")
    name = sorted(os.listdir(circle))[0]
    with open(os.path.join(circle, name), "ab") as f:
        f.write(b"\0")  # Same decoded pixels, another file: the key is of the content.
    assert _key(binary_dir).digest != _key(edited).digest
    relabelled = _copy(binary_dir, tmp_path / "relabelled")
    shutil.move(os.path.join(relabelled, "train", "circle", name),
                os.path.join(relabelled, "train", "square", "z" + name))
    assert _key(binary_dir).digest != _key(relabelled).digest
    # The flipped view covers train only: a validation image does not touch it.
    val = _copy(binary_dir, tmp_path / "val_edited")
    folder = os.path.join(val, "validation", "circle")
    with open(os.path.join(folder, sorted(os.listdir(folder))[0]), "ab") as f:
        f.write(b"\0")
    assert _key(binary_dir, "frontier", "flipped").digest == _key(val, "frontier",
                                                                  "flipped").digest
    assert _key(binary_dir, "frontier").digest != _key(val, "frontier").digest


def test_key_changes_with_the_prepared_manifest(binary_dir, tmp_path):
    from trainer.data import prepare

    out = str(tmp_path / "records")
    prepare.prepare(binary_dir, out)
    before = _key(out).digest
    with open(os.path.join(out, "manifest.json")) as f:
        text = f.read()
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write(text.replace('"layout"', '"layout" ', 1))
    assert _key(out).digest != before


def test_key_changes_with_mixed_precision(binary_dir):
    before = _key(binary_dir, "frontier").digest
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        assert _key(binary_dir, "frontier").digest != before
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_key_changes_with_tensorflow_version_and_folding(binary_dir, monkeypatch):
    before = _key(binary_dir).digest
    monkeypatch.setattr(tf, "__version__", tf.__version__ + ".post1")
    assert _key(binary_dir).digest != before
    monkeypatch.undo()
    monkeypatch.setattr(folding, "VERSION", folding.VERSION + 1)
    assert _key(binary_dir).digest != before


def test_key_ignores_flags_that_do_not_change_the_frozen_output(binary_dir, weights_files):
    # dropout is the one such input the model itself carries; the rest (rates,
    # epochs, batch size, optimizers) never reach FrozenWork's key at all.
    assert (_key(binary_dir, weights=weights_files[0]).digest
            == _key(binary_dir, weights=weights_files[0], dropout=0.5, seed=7).digest)


def test_the_screened_content_hashes_give_the_key_of_the_files(binary_dir, tmp_path):
    """The key takes the content hashes screen.py read instead of reading every file
    again; only while they name the split's paths exactly."""
    info = pipeline.describe(binary_dir)
    screened = screen.screen(info, binary_dir, "", str(tmp_path / "converted"))
    for name in ("train", "validation"):
        assert len(screened.splits[name].digests) == info.splits[name].count
        assert (cache_key.listing_digest(screened.splits[name])
                == cache_key.listing_digest(info.splits[name]))
    train = screened.splits["train"]
    forged = dataclasses.replace(train, digests=tuple((p, bytes(32)) for p in train.paths))
    assert cache_key.listing_digest(forged) != cache_key.listing_digest(train)  # Used...
    sample = tflite.spread_sample(forged, 3)  # ...but not for a listing they do not name.
    assert cache_key.listing_digest(sample) == cache_key.listing_digest(
        dataclasses.replace(sample, digests=()))
