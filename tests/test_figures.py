"""Pictures: TensorBoard images drawn with Pillow, learning curves with or without matplotlib."""

import logging
import sys

import numpy as np
import pytest
from PIL import Image

from trainer import figures

HISTORY = {
    "accuracy": [0.5, 0.6, 0.7, 0.8], "val_accuracy": [0.5, 0.55, 0.7, 0.75],
    "loss": [0.9, 0.7, 0.5, 0.4], "val_loss": [0.95, 0.8, 0.6, 0.5],
    "phase": [1.0, 1.0, 2.0, 2.0],
}


def test_confusion_matrix_image_is_an_rgb_picture_sized_by_classes():
    small = figures.confusion_matrix_image([[3, 1], [0, 4]], ["cat", "dog"])
    large = figures.confusion_matrix_image(np.eye(5, dtype=int), list("abcde"))
    assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3
    assert large.shape[0] > small.shape[0] and large.shape[1] > small.shape[1]
    assert small.min() < 128  # Shaded cells and text, not a blank canvas.


def test_prediction_grid_lays_out_rows_of_captioned_images():
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    probabilities = np.tile([[0.2, 0.8]], (6, 1))
    grid = figures.prediction_grid(images, [0, 1, 0, 1, 0, 1], probabilities, ["cat", "dog"],
                                   columns=4)
    one_row = figures.prediction_grid(images[:4], [0, 1, 0, 1], probabilities[:4],
                                      ["cat", "dog"], columns=4)
    assert grid.dtype == np.uint8 and grid.shape[1] == one_row.shape[1]
    assert grid.shape[0] > one_row.shape[0]  # Six images at four a row take two rows.


@pytest.mark.parametrize("phases, expected", [
    ([1.0, 1.0, 2.0, 2.0], 2),
    ([1.0, 2.0, 2.0], 1),        # Early stopping ended phase 1 after one epoch.
    ([1.0, 1.0], None),          # No phase 2.
    ([2.0, 2.0], None),          # A resumed run that only ran phase 2.
])
def test_fine_tune_start_is_read_from_the_phase_log(phases, expected):
    assert figures.fine_tune_start({"phase": phases}) == expected


def test_learning_curves_png(tmp_path):
    path = figures.save_learning_curves(HISTORY, str(tmp_path / "curves.png"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400


def test_learning_curves_skipped_loudly_without_matplotlib(tmp_path, monkeypatch, caplog):
    # None in sys.modules makes `import matplotlib...` raise ImportError.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING):
        assert figures.save_learning_curves(HISTORY, str(tmp_path / "curves.png")) is None
    assert not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in caplog.text and "[plots]" in caplog.text
