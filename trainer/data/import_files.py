"""Vertex AI image-classification import files (CSV, JSON Lines) -> rows of (uri, labels, split).

The formats Vertex AI datasets import for image classification (schemas
``image_classification_single_label_io_format`` and
``image_classification_multi_label_io_format``):

* CSV, one image per row, no header: ``[ML_USE,]GCS_FILE_PATH,LABEL[,LABEL...]``, with
  ``ML_USE`` one of ``training``, ``validation``, ``test``, ``unassigned``
  (any case; AutoML's older ``train`` too). Parsed with the ``csv`` module, so
  quoted fields may hold commas.
* JSON Lines, one object per line::

    {"imageGcsUri": "gs://bucket/a.jpg",
     "classificationAnnotation": {"displayName": "cat"},
     "dataItemResourceLabels": {"aiplatform.googleapis.com/ml_use": "training"}}

  ``classificationAnnotations`` (a list, the multi-label schema) is read too.

A row may name several labels (a multi-label image); each row's labels come
in file order, repeats dropped. Whether the job trains multi-label is the
trainer's ``--task`` (trainer/task_kind.py).

Paths may be gs://, absolute local paths, or relative to the import file's
folder. Each file is read once, whole, through ``tf.io.gfile``: nothing is
listed object by object. A row that cannot be used is returned as a
``BadRow`` with its file and line number, for the caller to skip or fail on.
"""

import csv
import dataclasses
import io
import json
import posixpath
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

CSV, JSONL = ".csv", ".jsonl"
ML_USE_KEY = "aiplatform.googleapis.com/ml_use"
# ML_USE value -> split; "" means unassigned (split by the caller's fractions).
ML_USE = {"training": "train", "train": "train", "validation": "validation",
          "test": "test", "unassigned": ""}
_IMAGE_ENDINGS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ico")


@dataclasses.dataclass(frozen=True)
class Row:
    """One usable row: the image, its labels and its split ('' when unassigned)."""

    where: str  # "file:line"
    uri: str  # resolved: gs://..., or an absolute or normalised local path
    labels: Tuple[str, ...]  # one or more, in the row's order
    split: str

    @property
    def label(self) -> str:
        """The first label (the only one of a single-label row)."""
        return self.labels[0]


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, and why."""

    where: str
    reason: str


def is_import_file(path: str) -> bool:
    return path.lower().endswith((CSV, JSONL))


def split_names(data: str) -> List[str]:
    """The comma-separated import files of a --data_dir value."""
    return [part.strip() for part in data.split(",") if part.strip()]


def resolve(uri: str, folder: str) -> str:
    """An import file's path as the trainer reads it: gs:// and absolute paths as they
    are, others relative to the import file's folder."""
    if uri.startswith("gs://") or posixpath.isabs(uri):
        return uri
    joined = posixpath.join(folder, uri)
    return joined if joined.startswith("gs://") else posixpath.normpath(joined)


def read_rows(path: str) -> Tuple[List[Row], List[BadRow]]:
    """Rows of one import file (CSV or JSON Lines, by its ending).

    Raises:
      tf.errors.NotFoundError: the file does not exist.
    """
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    folder = posixpath.dirname(path)
    parse = _parse_jsonl if path.lower().endswith(JSONL) else _parse_csv
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        parsed = parse(line, where)
        if isinstance(parsed, BadRow):
            bad.append(parsed)
            continue
        uri, labels, ml_use = parsed
        row = _row(where, uri, labels, ml_use, folder)
        (bad if isinstance(row, BadRow) else rows).append(row)
    return rows, bad


def _row(where: str, uri: str, labels: Sequence[str], ml_use: str, folder: str):
    labels = list(dict.fromkeys(label.strip() for label in labels if label and label.strip()))
    if not uri.strip():
        return BadRow(where, "no image path")
    if not labels:
        return BadRow(where, "empty label")
    key = ml_use.strip().lower() or "unassigned"
    if key not in ML_USE:
        return BadRow(where, f"unknown ML_USE {ml_use!r} (use training, validation, test "
                             "or unassigned)")
    return Row(where, resolve(uri.strip(), folder), tuple(labels), ML_USE[key])


def _looks_like_path(field: str) -> bool:
    field = field.strip()
    return "/" in field or field.lower().endswith(_IMAGE_ENDINGS)


def _parse_csv(line: str, where: str):
    """(uri, labels, ml_use) of a CSV row, or a BadRow."""
    try:
        [fields] = list(csv.reader(io.StringIO(line)))
    except (csv.Error, ValueError) as e:
        return BadRow(where, f"not a CSV row: {e}")
    if fields and fields[0].strip().lower() in ML_USE:
        return fields[1] if len(fields) > 1 else "", fields[2:], fields[0]
    if len(fields) >= 3 and not _looks_like_path(fields[0]) and _looks_like_path(fields[1]):
        return fields[1], fields[2:], fields[0]  # An ML_USE column with an unknown value.
    return fields[0], fields[1:], ""


def _parse_jsonl(line: str, where: str):
    """(uri, labels, ml_use) of a JSON Lines row, or a BadRow."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(where, f"not JSON: {e.msg}")
    if not isinstance(item, dict):
        return BadRow(where, "not a JSON object")
    uri = item.get("imageGcsUri")
    if not isinstance(uri, str):
        return BadRow(where, "no imageGcsUri")
    annotations: List[Optional[dict]] = []
    if isinstance(item.get("classificationAnnotation"), dict):
        annotations.append(item["classificationAnnotation"])
    if isinstance(item.get("classificationAnnotations"), list):
        annotations += item["classificationAnnotations"]
    labels = [a.get("displayName", "") for a in annotations if isinstance(a, dict)]
    labels = [label for label in labels if isinstance(label, str)]
    resource_labels = item.get("dataItemResourceLabels") or {}
    ml_use = resource_labels.get(ML_USE_KEY, "") if isinstance(resource_labels, dict) else ""
    return uri, labels, ml_use if isinstance(ml_use, str) else str(ml_use)
