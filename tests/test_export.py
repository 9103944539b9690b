"""The export's versioned layout: whole-or-nothing on gs:// under a kill at every write.

The deploy path (``model/``, ``AIP_MODEL_DIR``) holds numbered versions;
``export.resolve_model_dir`` gives the newest complete one (trainer/export.py).
The kill test stops an export after its Nth storage write, for every N from
0 to the number a whole export makes: the emulator refuses every request
from then on with a 403, which TensorFlow's gs:// client does not retry, so
nothing after that write reaches storage, as when the process is killed
there. After each, the deploy path must resolve to the old model or the new
one, byte for byte, and load and serve like it.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from trainer import export
from trainer import model as model_lib

CLASSES = ["circle", "square"]
SIZE = 32


def _files(folder):
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def _serve(folder, images):
    loaded = tf.saved_model.load(folder)
    return loaded.signatures["serving_images"](images=images)["probabilities"].numpy()


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Two different models staged locally: {'old'|'new': (folder, files, outputs)}, images."""
    root = tmp_path_factory.mktemp("staged")
    images = tf.random.stateless_uniform([3, SIZE, SIZE, 3], [1, 2], maxval=255.0)
    models = {}
    for seed, name in enumerate(("old", "new")):
        model = model_lib.create_model("demo_cnn", 2, SIZE, 0.2, weights=None, seed=seed)
        folder = export.stage_model(model, CLASSES, SIZE, str(root / name))
        models[name] = (folder, _files(folder), _serve(folder, images))
    assert not np.allclose(models["old"][2], models["new"][2])  # Told apart by their outputs.
    return models, images


def _which(served, models):
    """'old' or 'new': the staged model whose every file the served folder holds, byte for byte."""
    names = {os.path.relpath(p, served) for p in _walk(served)}
    for name, (_, files, _) in models.items():
        if names == set(files) and all(
                tf.io.gfile.GFile(f"{served}/{f}", "rb").read() == content
                for f, content in files.items()):
            return name
    raise AssertionError(f"{served} is neither model: it holds {sorted(names)}.")


def _walk(folder):
    return [f"{d.rstrip('/')}/{n}" for d, _, names in tf.io.gfile.walk(folder) for n in names]


def _abort_after(writes):
    """Every request after the first ``writes`` writes is refused, not retried: a kill there."""
    return [{"faults": ["403"], "after": writes, "after_kind": "write", "max_in_a_row": None}]


def test_a_kill_after_every_storage_write_leaves_the_old_or_the_new_model(
        staged, gcs, gcs_dir):
    models, images = staged
    (old, _, _), (new, _, _) = models["old"], models["new"]
    counted = f"{gcs_dir}/counted/model"
    export.publish(old, counted)
    gcs.reset_counts()
    export.publish(new, counted)
    writes = gcs.stats()["forwarded"]["write"]
    assert writes >= 2 * len(models["new"][1])  # An upload is two requests per file.

    served_by_kill = []
    for kill_at in range(writes + 1):
        deploy = f"{gcs_dir}/kill_{kill_at}/model"
        export.publish(old, deploy)
        with gcs.faults(_abort_after(kill_at)) as counts:
            try:
                export.publish(new, deploy)
            except tf.errors.PermissionDeniedError:
                pass
            else:  # Only when the kill falls after the last write (on the clean-up).
                assert kill_at == writes
        assert counts["forwarded"]["write"] == kill_at  # It stopped right there.
        served = export.resolve_model_dir(deploy)
        which = _which(served, models)
        np.testing.assert_allclose(_serve(served, images), models[which][2], rtol=1e-6)
        served_by_kill.append(which)
    # The deploy path switches once, from the old model to the new, with the
    # last write (saved_model.pb's), and never holds anything else.
    assert served_by_kill == ["old"] * writes + ["new"]

    # The next export after an interrupted one is whole, and removes the leftover.
    interrupted = f"{gcs_dir}/kill_{writes // 2}/model"
    assert tf.io.gfile.listdir(interrupted) == ["1/", "2/"]
    assert export.publish(new, interrupted) == f"{interrupted}/3"
    assert sorted(tf.io.gfile.listdir(interrupted)) == ["1/", "3/"]
    assert _which(export.resolve_model_dir(interrupted), models) == "new"
    print(f"kill points: {writes + 1}; bytes compared per kill: "
          f"{sum(map(len, models['new'][1].values()))}")


def test_versions_are_kept_two_deep_and_the_old_layout_still_resolves(staged, tmp_path):
    models, _ = staged
    (old, _, _), (new, _, _) = models["old"], models["new"]
    deploy = tmp_path / "model"
    shutil.copytree(old, deploy)  # A job dir of the old, unversioned layout.
    assert export.resolve_model_dir(str(deploy)) == str(deploy)
    assert export.read_class_names(str(deploy)) == CLASSES

    assert export.publish(new, str(deploy)) == f"{deploy}/1"
    assert export.resolve_model_dir(str(deploy)) == f"{deploy}/1"
    assert (deploy / export.SAVED_MODEL_FILE).exists()  # Kept as the previous model.
    export.publish(old, str(deploy))
    export.publish(new, str(deploy))
    assert sorted(os.listdir(deploy)) == ["2", "3"]  # Old layout and version 1 retired.
    assert export.resolve_model_dir(str(deploy)) == f"{deploy}/3"
    assert export.resolve_model_dir(f"{deploy}/2") == f"{deploy}/2"  # A version folder itself.


def test_a_path_without_a_model_is_an_error_naming_it(tmp_path):
    (tmp_path / "model" / "1").mkdir(parents=True)  # An export killed before saved_model.pb.
    with pytest.raises(FileNotFoundError, match=f"No exported model at {tmp_path}/model"):
        export.resolve_model_dir(str(tmp_path / "model"))


def test_the_command_prints_the_folder_to_upload(tmp_path, capsys):
    (tmp_path / "model" / "1").mkdir(parents=True)
    (tmp_path / "model" / "1" / export.SAVED_MODEL_FILE).write_bytes(b"")
    (tmp_path / "model" / "2").mkdir()  # Incomplete: no saved_model.pb yet.
    assert export.main(["export", str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}/model/1"
    assert export.main(["export", str(tmp_path / "none")]) == 1
    assert "No exported model at" in capsys.readouterr().err
