"""Pictures of a run's results: confusion matrix, prediction grid, learning curves.

The confusion matrix and the prediction grid are drawn with Pillow (a hard
dependency) into uint8 arrays that ``evaluate`` writes to TensorBoard, so
they exist in every run. The learning-curves PNG needs matplotlib, an
optional extra (``pip install 'transfer-trainer[plots]'``); without it the
PNG is skipped with a warning, and the same curves remain in TensorBoard.
"""

import io
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image, ImageDraw, ImageFont

LEARNING_CURVES_FILE = "learning_curves.png"

_CELL = 56          # Confusion-matrix cell side, pixels.
_TILE = 112         # Prediction-grid image side, pixels.
_FONT_SIZE = 12
_CORRECT = (20, 130, 40)
_WRONG = (200, 30, 30)


def _font(size: int = _FONT_SIZE):
    # Pillow's bundled scalable font; the same text on every machine.
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def confusion_matrix_image(confusion: Sequence[Sequence[int]],
                           class_names: Sequence[str]) -> np.ndarray:
    """The confusion matrix as a picture: rows true, columns predicted.

    Cells are shaded by the share of their row (the recall view) and show
    the count, so both rare and common classes read at a glance.

    Returns:
      uint8 array [height, width, 3].
    """
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_width(probe, name, font) for name in class_names) + 12
    left, top = label_width + 18, label_width + 18
    image = Image.new("RGB", (left + n * _CELL + 8, top + n * _CELL + 8), "white")
    draw = ImageDraw.Draw(image)
    row_totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shares = counts / row_totals
    for i in range(n):
        for j in range(n):
            x, y = left + j * _CELL, top + i * _CELL
            shade = int(255 - 200 * shares[i, j])
            draw.rectangle((x, y, x + _CELL, y + _CELL), fill=(shade, shade, 255),
                           outline=(160, 160, 160))
            text = str(counts[i, j])
            colour = "white" if shares[i, j] > 0.6 else "black"
            draw.text((x + (_CELL - _text_width(draw, text, font)) / 2, y + _CELL / 2 - 7),
                      text, fill=colour, font=font)
    for k, name in enumerate(class_names):
        draw.text((left - 6 - _text_width(draw, name, font), top + k * _CELL + _CELL / 2 - 7),
                  name, fill="black", font=font)
        _draw_vertical_text(image, name, (left + k * _CELL + _CELL / 2 - 7, top - 6), font)
    draw.text((4, 4), "rows: true", fill="black", font=font)
    draw.text((4, 20), "columns: predicted", fill="black", font=font)
    return np.asarray(image, dtype=np.uint8)


def _draw_vertical_text(image: Image.Image, text: str, bottom_left, font) -> None:
    """Text rotated a quarter turn, its end at ``bottom_left``, for column headers."""
    probe = ImageDraw.Draw(image)
    width = _text_width(probe, text, font) + 2
    strip = Image.new("RGB", (width, 16), "white")
    ImageDraw.Draw(strip).text((1, 0), text, fill="black", font=font)
    strip = strip.rotate(90, expand=True)
    x, y = bottom_left
    image.paste(strip, (int(x), int(y - strip.height)))


def prediction_grid(images: np.ndarray, labels: Sequence[int], probabilities: np.ndarray,
                    class_names: Sequence[str], columns: int = 4) -> np.ndarray:
    """Sample images with their true label and the predicted label and probability.

    Captions are green when the prediction is right and red when wrong, as
    in the recipe's plotted grid.

    Args:
      images: float or uint8 [n, h, w, 3] pixels in [0, 255].
      labels: true class indices [n].
      probabilities: [n, classes].
      class_names: names in index order.
      columns: images per row.

    Returns:
      uint8 array [height, width, 3].
    """
    n = len(images)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    caption = 34
    font = _font()
    grid = Image.new("RGB", (columns * (_TILE + 8) + 8, rows * (_TILE + caption + 8) + 8),
                     "white")
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        x = 8 + (k % columns) * (_TILE + 8)
        y = 8 + (k // columns) * (_TILE + caption + 8)
        pixels = np.clip(np.asarray(images[k], dtype=np.float32), 0, 255).astype(np.uint8)
        grid.paste(Image.fromarray(pixels).resize((_TILE, _TILE), Image.NEAREST), (x, y))
        predicted = int(np.argmax(probabilities[k]))
        colour = _CORRECT if predicted == int(labels[k]) else _WRONG
        draw.text((x, y + _TILE + 2), f"true: {class_names[int(labels[k])]}",
                  fill="black", font=font)
        draw.text((x, y + _TILE + 17),
                  f"pred: {class_names[predicted]} {probabilities[k][predicted]:.2f}",
                  fill=colour, font=font)
    return np.asarray(grid, dtype=np.uint8)


def save_png(pixels: np.ndarray, path: str) -> str:
    """Writes a uint8 [height, width, 3] picture as a PNG file, local or gs://."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def fine_tune_start(history: Dict[str, List[float]]) -> Optional[int]:
    """Index of the first phase-2 epoch in ``history``, or None without phase 2.

    Read from the per-epoch ``phase`` log rather than from --epochs, so the
    marker stays right when early stopping shortens phase 1 or a resumed run
    holds only some epochs.
    """
    phases = history.get("phase", [])
    for index in range(1, len(phases)):
        if phases[index] >= 2 > phases[index - 1]:
            return index
    return None


def save_learning_curves(history: Dict[str, List[float]], path: str) -> Optional[str]:
    """Writes accuracy and loss (train and validation) per epoch as a PNG.

    A dashed vertical line marks where fine-tuning starts, as in the recipe.

    Args:
      history: Keras history of both phases, joined (``accuracy``, ``loss``,
        ``val_accuracy``, ``val_loss``, ``phase`` lists).
      path: the PNG to write, local or gs://.

    Returns:
      ``path``, or None when matplotlib is not installed (logged).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logging.warning(
            "matplotlib is not installed, so %s is skipped; install the 'plots' "
            "extra (pip install 'transfer-trainer[plots]') to get it. The same "
            "curves are in TensorBoard.", path)
        return None
    figure = Figure(figsize=(8, 8), dpi=100)
    start = fine_tune_start(history)
    for row, (metric, title) in enumerate((("accuracy", "Accuracy"), ("loss", "Cross-entropy"))):
        axes = figure.add_subplot(2, 1, row + 1)
        for key, name in ((metric, "Training"), (f"val_{metric}", "Validation")):
            values = history.get(key, [])
            axes.plot(range(1, len(values) + 1), values, marker="o", label=f"{name} {metric}")
        if start is not None:
            # Between the last phase-1 epoch and the first phase-2 epoch.
            axes.axvline(start + 0.5, color="gray", linestyle="--", label="Start fine-tuning")
        axes.set_title(f"{title} per epoch")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
