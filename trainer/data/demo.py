"""The generated demo data: JPEG folders of procedurally drawn shapes.

Two tasks are drawn from the same family of images (random colours, sizes,
positions, rotations and noise), with disjoint classes:

* the *target* task, circle / square / triangle, is what the demo classifies;
* the *source* task, five other shapes, pre-trains the demo backbone, so the
  target task has a backbone that has learned edges and corners to transfer
  from, the way ImageNet weights serve real photographs.

Generation is deterministic for a seed and idempotent: a folder holding a
matching ``demo.json`` is left as it is.
"""

import io
import json
import math
import random
from typing import Dict, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

TARGET_CLASSES = ("circle", "square", "triangle")
SOURCE_CLASSES = ("cross", "star", "ring", "pentagon", "bar")
_MARKER = "demo.json"


def _star(cx, cy, r, rotation, points=5):
    corners = []
    for i in range(2 * points):
        radius = r if i % 2 == 0 else r * 0.45
        angle = rotation + math.pi * i / points
        corners.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return corners


def _rotated_rect(cx, cy, half_w, half_h, rotation):
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + x * c - y * s, cy + x * s + y * c)
            for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rotation, colour):
    degrees = math.degrees(rotation)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.regular_polygon((cx, cy, r), 4, rotation=degrees, fill=colour)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=degrees, fill=colour)
    elif shape == "pentagon":
        draw.regular_polygon((cx, cy, r), 5, rotation=degrees, fill=colour)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r, rotation), fill=colour)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r / 3)))
    elif shape == "cross":
        draw.polygon(_rotated_rect(cx, cy, r, r / 3.5, rotation), fill=colour)
        draw.polygon(_rotated_rect(cx, cy, r / 3.5, r, rotation), fill=colour)
    elif shape == "bar":
        draw.polygon(_rotated_rect(cx, cy, r, r / 3, rotation), fill=colour)
    else:
        raise ValueError(f"Unknown shape {shape!r}.")


def _random_colour(rng: random.Random, avoid=None):
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid)) > 200:
            return colour


def draw_image(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One image of ``shape`` with random colours, placement and noise."""
    background = _random_colour(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.2, 0.38)
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi),
                _random_colour(rng, avoid=background))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_dataset(root: str, classes: Sequence[str], counts: Dict[str, int],
                  size: int = 64, seed: int = 0) -> str:
    """Writes ``root/<split>/<class>/<n>.jpg`` unless an identical set is there.

    Args:
      root: output folder, local or gs://.
      classes: shape names (see _draw_shape).
      counts: images per class for each split, e.g. {'train': 100}.
      size: image side, pixels.
      seed: generation seed.

    Returns:
      root.
    """
    root = root.rstrip("/")
    params = {"classes": list(classes), "counts": counts, "size": size, "seed": seed}
    marker = f"{root}/{_MARKER}"
    if tf.io.gfile.exists(marker):
        with tf.io.gfile.GFile(marker) as f:
            if json.load(f) == params:
                return root
    for split_index, (split, count) in enumerate(sorted(counts.items())):
        for class_index, shape in enumerate(classes):
            folder = f"{root}/{split}/{shape}"
            tf.io.gfile.makedirs(folder)
            rng = random.Random(f"{seed}-{split_index}-{class_index}")
            for i in range(count):
                buffer = io.BytesIO()
                draw_image(shape, size, rng).save(buffer, format="JPEG", quality=90)
                with tf.io.gfile.GFile(f"{folder}/{i:04d}.jpg", "wb") as f:
                    f.write(buffer.getvalue())
    with tf.io.gfile.GFile(marker, "w") as f:
        json.dump(params, f)  # Last: its presence means the set is complete.
    return root
