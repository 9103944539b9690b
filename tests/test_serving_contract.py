"""The exported model's contract as Vertex AI's TensorFlow container uses it.

A learned job's SavedModel (tests/learnable.py's colour task) gets the JSON
bodies Vertex AI sends: an online request of ``{"image_bytes": {"b64": ...}}``
instances and the ``{"b64": ...}`` instances of a batch prediction over a
file list of gs:// images (read from the Cloud Storage emulator). Each body is
turned into signature inputs by TensorFlow Serving's documented rules
(deploy/prediction_json.py) and run through the real SavedModel; the served
labels must reproduce the job's own test accuracy. ``saved_model_cli show``,
TensorFlow's own tool, must list the signature docs/vertex.md documents.
"""

import base64
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import app
from absl import flags

from deploy import prediction_json
from deploy import serve
from trainer import export
from trainer import predict

import learnable  # tests/learnable.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "vertex.md")


def _test_images(config):
    """(path, true class name) of every test image of the job's data."""
    paths = sorted(glob.glob(os.path.join(config.data_dir, "test", "*", "*.jpg")))
    return [(path, os.path.basename(os.path.dirname(path))) for path in paths]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _wire(body):
    """The body as the container receives it: serialized JSON, parsed again."""
    return json.loads(json.dumps(body))


@pytest.fixture(scope="module")
def loaded(learned_job):
    """The learned job's SavedModel, loaded once."""
    config, _ = learned_job
    return tf.saved_model.load(export.resolve_model_dir(config.model_dir))


@pytest.fixture(scope="module")
def served(learned_job, loaded):
    """(model_dir, test images, the response to an online request of all of them)."""
    config, _ = learned_job
    images = _test_images(config)
    body = _wire({"instances": [prediction_json.image_instance(_read(p)) for p, _ in images]})
    # The served version (trainer/export.py), the folder a Model's artifactUri names.
    return export.resolve_model_dir(config.model_dir), images, prediction_json.predict(loaded, body)


# ---------------------------------------------------------------- Requests


def test_b64_instances_become_the_image_bytes_input_byte_for_byte(learned_job):
    config, _ = learned_job
    images = [_read(path) for path, _ in _test_images(config)[:3]]
    body = _wire({"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}}
                                for b in images]})

    inputs = prediction_json.instances_to_inputs(body, {"image_bytes": "string"})

    assert list(inputs) == ["image_bytes"]
    assert inputs["image_bytes"].shape == (3,)
    assert list(inputs["image_bytes"]) == images


def test_online_request_reproduces_the_jobs_test_accuracy(learned_job, served):
    _, metrics = learned_job
    model_dir, images, response = served
    predictions = response["predictions"]
    class_names = export.read_class_names(model_dir)

    assert len(predictions) == len(images)
    correct = sum(p["label"] == true for p, (_, true) in zip(predictions, images))
    assert correct / len(images) == pytest.approx(metrics["test"]["accuracy"])
    assert correct / len(images) >= learnable.BAR
    for p in predictions:
        assert p["class_names"] == class_names
        assert p["label"] == class_names[p["class_index"]]
        assert p["score"] == max(p["probabilities"])
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_online_response_matches_the_predict_command(served):
    model_dir, images, response = served
    expected = list(predict.predict_files(model_dir, [p for p, _ in images]))

    assert [p["label"] for p in response["predictions"]] == [e["label"] for e in expected]
    assert [p["score"] for p in response["predictions"]] == pytest.approx(
        [e["score"] for e in expected], abs=1e-6)


def test_file_list_batch_instances_from_gcs_give_the_same_predictions(served, loaded, gcs_dir):
    model_dir, images, response = served
    uris = []
    for i, (path, _) in enumerate(images):
        uris.append(f"{gcs_dir}/images/{i:03d}.jpg")
        tf.io.gfile.copy(path, uris[-1])
    file_list = f"{gcs_dir}/images.txt"
    with tf.io.gfile.GFile(file_list, "w") as f:
        f.write("\n".join(uris) + "\n")

    instances = prediction_json.read_file_list_instances(file_list)

    assert instances[0] == {"b64": base64.b64encode(_read(images[0][0])).decode()}
    batch = prediction_json.predict(loaded, _wire({"instances": instances}))
    assert batch == response


def test_keyed_json_lines_instances_need_the_key_held_back(served, loaded):
    model_dir, images, response = served
    lines = [json.loads(line) for line in serve.instance_lines([p for p, _ in images])]

    assert [line["key"] for line in lines] == [p for p, _ in images]
    # Sent as they are, the key is an input the signature lacks: TF Serving answers 400.
    with pytest.raises(prediction_json.RequestError, match="exactly \\['image_bytes'\\]"):
        prediction_json.instances_to_inputs({"instances": lines}, {"image_bytes": "string"})
    # instanceConfig.keyField (deploy/serving/batch_jsonl.yaml) holds it back from the model.
    held_back = [{k: v for k, v in line.items() if k != "key"} for line in lines]
    assert prediction_json.predict(loaded, {"instances": held_back}) == response


def test_signature_def_path_of_tf_serving_gives_the_same_response(served):
    """TF Serving loads the MetaGraphDef into a Session and feeds the SignatureDef's
    tensors by name; benchmarks/serving_container.py does this under TF 2.15."""
    from benchmarks import serving_container_worker

    model_dir, images, response = served
    body = _wire({"instances": [prediction_json.file_list_instance(_read(p))
                                for p, _ in images[:4]]})

    result = serving_container_worker.serve(model_dir, body)

    assert result["method_name"] == "tensorflow/serving/predict"
    got, expected = result["response"]["predictions"], response["predictions"][:4]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected):
        assert sorted(g) == sorted(e)
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)


def test_response_is_json_with_the_documented_outputs(served):
    _, _, response = served
    first = response["predictions"][0]

    assert sorted(first) == sorted(name for kind, name, _, _ in _documented_signature()
                                   if kind == "output")
    assert isinstance(first["label"], str)  # Not {"b64": ...}: no output name ends in _bytes.
    assert json.loads(json.dumps(response)) == response


@pytest.mark.parametrize("body, message", [
    ({"instances": [{"image": {"b64": "AAAA"}}]}, r"keys \['image'\].*exactly \['image_bytes'\]"),
    ({"instances": [{"image_bytes": {"b64": "AAAA", "x": 1}}]}, r"only allowed as \{\"b64\""),
    ({"instances": [{"image_bytes": {"b64": "not base64!"}}]}, "unable to base64 decode"),
    ({"instances": [{"b64": "AAAA"}, {"image_bytes": {"b64": "AAAA"}}]}, "not a mix"),
    ({"instances": []}, "non-empty list"),
    ({"inputs": {"image_bytes": [{"b64": "AAAA"}]}}, "row format"),
])
def test_bodies_the_container_would_reject(body, message):
    with pytest.raises(prediction_json.RequestError, match=message):
        prediction_json.instances_to_inputs(body, {"image_bytes": "string"})


def test_several_inputs_need_named_instances():
    with pytest.raises(prediction_json.RequestError, match="several inputs"):
        prediction_json.instances_to_inputs({"instances": [{"b64": "AAAA"}]},
                                            {"image_bytes": "string", "key": "string"})


def test_local_command_answers_a_request_file_and_images_alike(served, tmp_path):
    model_dir, images, response = served
    paths = [p for p, _ in images[:2]]
    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps(serve.request_body(paths)))  # What `serve request` prints.

    answers = []
    for source in (f"--request={body_file}", f"--images={','.join(paths)}"):
        flag_values = flags.FlagValues()
        serve.define_flags(flag_values)
        flag_values(["serve", f"--model_dir={model_dir}", source])
        answers.append(json.loads(serve._local(flag_values)))

    assert answers[0] == answers[1] == {"predictions": response["predictions"][:2]}


def test_local_command_names_an_unreadable_or_undecodable_image(served, tmp_path):
    model_dir, _, _ = served
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(app.UsageError, match="--images: cannot read .*missing.jpg"):
        serve.request_body([str(tmp_path / "missing.jpg")])

    flag_values = flags.FlagValues()
    serve.define_flags(flag_values)
    flag_values(["serve", f"--model_dir={model_dir}", f"--images={tmp_path / 'notes.jpg'}"])
    with pytest.raises(app.UsageError, match="could not run this request: Unknown image file"):
        serve._local(flag_values)


# ------------------------------------------------ saved_model_cli and the docs


def _documented_signature():
    """(kind, name, dtype, shape) rows of docs/vertex.md's signature table."""
    with open(DOCS) as f:
        text = f.read()
    rows = re.findall(r"^\| (input|output) \| `(\w+)` \| (DT_\w+) \| `(\([^`]*\))` \|",
                      text, flags=re.MULTILINE)
    assert rows, "docs/vertex.md lost its serving_default table"
    return rows


def _saved_model_cli_signature(model_dir):
    """(kind, name, dtype, shape) of serving_default as saved_model_cli shows them."""
    out = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
         "--dir", model_dir, "--all"], capture_output=True, text=True, check=True,
        timeout=120).stdout
    block = out.split("signature_def['serving_default']:")[1].split("signature_def[")[0]
    inputs, outputs = block.split("contains the following output(s):")
    rows = []
    for kind, part in (("input", inputs), ("output", outputs)):
        for name, dtype, shape in re.findall(
                r"(?:inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\))",
                part):
            rows.append((kind, name, dtype, shape))
    method = re.search(r"Method name is: (\S+)", block).group(1)
    return sorted(rows), method


def test_saved_model_cli_shows_the_documented_signature(learned_job):
    model_dir = export.resolve_model_dir(learned_job[0].model_dir)
    classes = len(export.read_class_names(model_dir))

    rows, method = _saved_model_cli_signature(model_dir)

    documented = sorted((kind, name, dtype, shape.replace("K", str(classes)))
                        for kind, name, dtype, shape in _documented_signature())
    assert rows == documented
    assert method == "tensorflow/serving/predict"
