"""The prediction command over a finished job's model: files, folders, globs, bad files, gs://."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import flags

from trainer import predict


def _run(argv):
    flag_values = flags.FlagValues()
    predict.define_flags(flag_values)
    flag_values(["prog"] + argv)
    return predict.run(flag_values)


@pytest.fixture
def image_folder(finished_job, tmp_path):
    """Two good test images (one in a subfolder), a corrupt .jpg and a text file."""
    config, metrics = finished_job
    test_dir = os.path.join(config.data_dir, "test")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(test_dir, "circle", "0000.jpg"), folder / "circle.jpg")
    shutil.copy(os.path.join(test_dir, "star", "0000.jpg"), folder / "sub" / "star.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("skipped: not an image extension")
    return folder


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_bad_image_gets_its_own_error_and_the_rest_run(finished_job, image_folder, capsys):
    config, metrics = finished_job
    code = _run([f"--model={config.model_dir}", f"--images={image_folder}/*.jpg",
                 f"--images={image_folder}/missing.png", "--json", "--batch_size=8"])
    results = {os.path.basename(r["path"]): r for r in _json_lines(capsys.readouterr().out)}
    assert code == 0
    assert set(results) == {"circle.jpg", "broken.jpg", "missing.png"}
    assert results["circle.jpg"]["label"] in metrics["class_names"]
    assert 0.0 <= results["circle.jpg"]["score"] <= 1.0
    assert "not a decodable image" in results["broken.jpg"]["error"]
    assert "cannot read" in results["missing.png"]["error"]


def test_folder_is_searched_recursively_and_top_k_ranks_classes(finished_job, image_folder,
                                                               capsys):
    config, metrics = finished_job
    code = _run([f"--model={config.model_dir}", f"--images={image_folder}", "--top_k=3",
                 "--json"])
    results = _json_lines(capsys.readouterr().out)
    by_name = {os.path.basename(r["path"]): r for r in results}
    assert code == 0
    assert set(by_name) == {"circle.jpg", "star.jpg", "broken.jpg"}  # Not notes.txt.
    ranked = by_name["star.jpg"]["top_k"]
    assert len(ranked) == 3
    assert [c["probability"] for c in ranked] == sorted(
        (c["probability"] for c in ranked), reverse=True)
    assert ranked[0]["label"] == by_name["star.jpg"]["label"]


def test_exit_status_is_nonzero_only_when_nothing_was_predicted(finished_job, image_folder,
                                                                capsys):
    config, _ = finished_job
    assert _run([f"--model={config.model_dir}", f"--images={image_folder}/broken.jpg"]) == 1
    assert "ERROR not a decodable image" in capsys.readouterr().err


def test_command_line_entry_point(finished_job, image_folder):
    config, metrics = finished_job
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.predict", f"--model={config.model_dir}",
         f"--images={image_folder}/circle.jpg", f"--images={image_folder}/broken.jpg"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert completed.returncode == 0, completed.stderr[-2000:]
    line, = completed.stdout.splitlines()
    assert line.startswith(f"{image_folder}/circle.jpg: ")
    assert line.split(": ", 1)[1].split(" (")[0] in metrics["class_names"]
    assert "broken.jpg: ERROR" in completed.stderr
    assert "Predicted 1 of 2 images; 1 failed." in completed.stderr


def test_model_and_images_on_cloud_storage(finished_job, image_folder, gcs_dir, capsys):
    config, metrics = finished_job
    model_dir, images_dir = f"{gcs_dir}/model", f"{gcs_dir}/images"
    _copy_tree(config.model_dir, model_dir)
    _copy_tree(str(image_folder), images_dir)
    code = _run([f"--model={model_dir}", f"--images={images_dir}/*.jpg", "--json"])
    results = {r["path"]: r for r in _json_lines(capsys.readouterr().out)}
    assert code == 0
    assert set(results) == {f"{images_dir}/circle.jpg", f"{images_dir}/broken.jpg"}
    assert results[f"{images_dir}/circle.jpg"]["label"] in metrics["class_names"]
    assert "error" in results[f"{images_dir}/broken.jpg"]


def _copy_tree(source, target):
    for directory, _, files in tf.io.gfile.walk(source):
        relative = os.path.relpath(directory, source)
        folder = target if relative == "." else f"{target}/{relative}"
        for name in files:
            tf.io.gfile.copy(f"{directory}/{name}", f"{folder}/{name}", overwrite=True)
