"""A small generated task that the trainer learns in seconds, and what "learned" means.

The classes are colours (red, green, blue shapes on grey, with noise), so even
a backbone with random weights gives features a head can separate: a short
run of the real trainer on 32-px images reaches validation and test accuracy
near 1, where chance is 1/3. ``failures`` lists the checks a run missed; the
learning tests assert it is empty, and a run on mispaired labels fails them
(see ``test_learning.py``), which is how the bar is known to have a margin.
"""

import io
import os
import random
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"blue": (40, 60, 210), "green": (40, 180, 40), "red": (200, 40, 40)}
COUNTS = {"train": 16, "validation": 8, "test": 8}
BAR = 0.8  # Accuracy a run must reach; chance is 1/3, a run that learned ~1.0.

# Trainer settings of a learning run (flag names); 48 train images, batch 8:
# 6 steps per epoch, 4 epochs of phase 1, 2 of phase 2.
SETTINGS = dict(backbone="demo_cnn", fine_tune_at=6, image_size=32, batch_size=8,
                epochs=4, fine_tune_epochs=2, learning_rate=2e-2,
                fine_tune_learning_rate=1e-3, weights="none", seed=0)


def _image(rgb, size: int, rng: random.Random) -> bytes:
    grey = rng.randrange(60, 200)
    image = Image.new("RGB", (size, size), (grey,) * 3)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(int(np.clip(c + rng.gauss(0, 25), 0, 255)) for c in rgb)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return noisy_jpeg(image, 12, rng)


def noisy_jpeg(image: Image.Image, sigma: float, rng: random.Random) -> bytes:
    """``image`` with Gaussian pixel noise of ``sigma`` (seeded from ``rng``), as JPEG bytes."""
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, sigma, (*image.size[::-1], 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_dataset(root: str, size: int = 32, seed: int = 0,
                  counts: Dict[str, int] = COUNTS) -> str:
    """Writes root/<split>/<colour>/<n>.jpg; returns root."""
    for split_index, (split, count) in enumerate(sorted(counts.items())):
        for class_index, (name, rgb) in enumerate(CLASSES.items()):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            rng = random.Random(f"{seed}-{split_index}-{class_index}")
            for i in range(count):
                with open(os.path.join(folder, f"{i:04d}.jpg"), "wb") as f:
                    f.write(_image(rgb, size, rng))
    return root


def failures(metrics: dict, epochs: int = SETTINGS["epochs"],
             fine_tune_epochs: int = SETTINGS["fine_tune_epochs"]) -> List[str]:
    """The learning checks a finished run's metrics miss (empty: it learned).

    Phase 1 must reach the bar on validation by its last epoch, phase 2 on its
    own training batches by its last (a phase 2 that reads wrong labels fits
    noise, whatever phase 1 left), and the exported model on validation and
    test images.
    """
    history = metrics["history"]
    checks = {"test accuracy": metrics["test"]["accuracy"],
              "validation accuracy": metrics["validation"]["accuracy"]}
    if epochs:
        checks["phase 1 last val_accuracy"] = history["val_accuracy"][epochs - 1]
    if fine_tune_epochs:
        checks["phase 2 last train accuracy"] = history["accuracy"][-1]
    return [f"{name} {value:.3f} < {BAR}" for name, value in checks.items() if value < BAR]
