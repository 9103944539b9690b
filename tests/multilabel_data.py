"""A generated multi-label task: 32-px images holding 1-3 of 4 coloured shapes, as a JSONL
import file in Vertex AI's multi-label format.

Each image draws each of its classes once, as a disc or a square in a
quadrant of its own (so shapes never hide each other), on grey with noise.
The classes are colours, as in tests/learnable.py, so even a backbone with
random weights gives features a head can separate. ``write_import_file``
writes the JPEGs and ``import.jsonl`` with ``classificationAnnotations`` and
``dataItemResourceLabels["aiplatform.googleapis.com/ml_use"]``.
"""

import itertools
import json
import os
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

import learnable

CLASSES = {"blue": (40, 60, 210), "green": (40, 180, 40), "red": (200, 40, 40),
           "yellow": (220, 210, 40)}
COUNTS = {"train": 56, "validation": 28, "test": 28}
ML_USE = {"train": "training", "validation": "validation", "test": "test"}
# Every set of 1-3 of the 4 classes (14), dealt in turn: each split holds all of them.
LABEL_SETS = [combo for size in (1, 2, 3) for combo in itertools.combinations(sorted(CLASSES), size)]


def image(labels: Sequence[str], size: int, rng: random.Random) -> bytes:
    """A JPEG holding one shape per label, each in its own quadrant."""
    grey = rng.randrange(70, 190)
    picture = Image.new("RGB", (size, size), (grey,) * 3)
    draw = ImageDraw.Draw(picture)
    half = size / 2
    quadrants = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], len(labels))
    for name, (qx, qy) in zip(labels, quadrants):
        r = half * rng.uniform(0.3, 0.45)
        cx = qx * half + rng.uniform(r, half - r)
        cy = qy * half + rng.uniform(r, half - r)
        colour = tuple(int(np.clip(c + rng.gauss(0, 20), 0, 255)) for c in CLASSES[name])
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return learnable.noisy_jpeg(picture, 10, rng)


def rows(root: str, size: int = 32, seed: int = 0,
         counts: Dict[str, int] = COUNTS) -> List[Tuple[str, str, Tuple[str, ...]]]:
    """Writes the images under ``root``; returns (split, path, labels) per image."""
    written = []
    for split, count in counts.items():
        rng = random.Random(f"{seed}-{split}")
        folder = os.path.join(root, "images", split)
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            labels = LABEL_SETS[i % len(LABEL_SETS)]
            path = os.path.join(folder, f"{i:04d}.jpg")
            with open(path, "wb") as f:
                f.write(image(labels, size, rng))
            written.append((split, path, labels))
    return written


def jsonl_line(path: str, labels: Sequence[str], split: str) -> str:
    """One Vertex AI multi-label JSON Lines row."""
    return json.dumps({
        "imageGcsUri": path,
        "classificationAnnotations": [{"displayName": name} for name in labels],
        "dataItemResourceLabels": {"aiplatform.googleapis.com/ml_use": ML_USE[split]},
    }) + "\n"


def write_import_file(root: str, seed: int = 0, shuffle_labels: bool = False,
                      counts: Dict[str, int] = COUNTS) -> str:
    """Images and ``root/import.jsonl``; returns the import file's path.

    ``shuffle_labels``: the train rows' label sets are permuted among the
    images (a control that must not learn).
    """
    written = rows(root, seed=seed, counts=counts)
    if shuffle_labels:
        train = [i for i, row in enumerate(written) if row[0] == "train"]
        permuted = [written[i][2] for i in train]
        random.Random(seed).shuffle(permuted)
        for i, labels in zip(train, permuted):
            written[i] = (written[i][0], written[i][1], labels)
    path = os.path.join(root, "import.jsonl")
    with open(path, "w") as f:
        f.writelines(jsonl_line(p, labels, split) for split, p, labels in written)
    return path
