"""How large a split's images are: the median shorter side of an evenly spread sample.

``--recipe=auto`` trains at the backbone's native resolution when the images
are at least that large (trainer/recipe.py). Image files are sized from
their headers (Pillow reads only the first bytes); prepared records from the
stored ``image/height`` and ``image/width`` of their first records. Local
and gs:// alike, through ``tf.io.gfile`` and ``tf.data``.
"""

import statistics
from typing import List, Optional

import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from trainer.data import pipeline
from trainer.data import records

SAMPLE = 32  # Images sized per split.


def median_short_side(split: pipeline.Split, sample: int = SAMPLE) -> Optional[int]:
    """The median of min(height, width) over up to ``sample`` images; None if none sized."""
    sides = _record_sides(split, sample) if split.is_records else _file_sides(split, sample)
    return int(statistics.median(sides)) if sides else None


def _file_sides(split: pipeline.Split, sample: int) -> List[int]:
    step = max(1, len(split.paths) // sample)
    sides = []
    for path in split.paths[::step][:sample]:
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                sides.append(min(Image.open(f).size))
        except (OSError, UnidentifiedImageError, tf.errors.OpError):
            continue  # The check before training reports unreadable files.
    return sides


def _record_sides(split: pipeline.Split, sample: int) -> List[int]:
    sides = []
    for serialized in tf.data.TFRecordDataset(list(split.shards[:4])).take(sample):
        fields = records.parse_all(serialized)
        sides.append(int(min(fields[records.HEIGHT], fields[records.WIDTH])))
    return sides
