"""Multi-label images made from single-label photos: 2x2 mosaics and their import file.

For the multi-label benchmark (benchmarks/multilabel.py). From a folder of
``train/`` and ``validation/`` class folders (cats_and_dogs_filtered), each
mosaic is a square of four tiles holding 1-4 photos; its labels are the
classes its photos show (``cats`` -> ``cat``: ``LABELS``). Written as new
JPEG files with a Vertex AI JSON Lines import file (the multi-label schema,
``classificationAnnotations``), one row per mosaic with its ML_USE.

How a mosaic is made (all of it seeded, so the same arguments give the same
bytes):

* its label set is drawn uniformly from {cat}, {dog}, {cat, dog}; a single
  label gets 1-4 photos of that class, both labels 2-4 photos with at least
  one of each (the rest of either class), placed on random tiles;
* photos come from a per-class deck, shuffled and dealt without
  replacement, reshuffled when empty, so every photo of a split is used
  before any is used again;
* a photo is centre-cropped to a square and resized to the tile
  (Lanczos), so no animal is squashed;
* an empty tile is flat mid-grey (128): it carries no label, and MobileNet's
  input scaling maps it to about zero. A blurred photo or a copy of a
  neighbour would put cat- or dog-like texture in a tile that must count as
  neither.

Splits never share a photo: train mosaics use the train photos only;
validation photos are split per class into two disjoint halves (seeded),
one for the validation mosaics and one for the test mosaics.

``write_reference`` links the same photos into a single-label
``train/ validation/ test/`` folder: the single-label model trained on the
train photos and tested on exactly the photos inside the test mosaics.
"""

import collections
import dataclasses
import json
import os
import random
from typing import Dict, List, Sequence, Tuple

LABELS = {"cats": "cat", "dogs": "dog"}  # Class folder -> label.
GREY = (128, 128, 128)
ML_USE_KEY = "aiplatform.googleapis.com/ml_use"
ML_USE = {"train": "training", "validation": "validation", "test": "test"}
IMPORT_FILE = "import.jsonl"
CONTENTS_FILE = "mosaics.json"


@dataclasses.dataclass(frozen=True)
class Mosaic:
    """One written mosaic: its file, split, labels and photo per tile (None: grey)."""

    path: str
    split: str
    labels: Tuple[str, ...]
    tiles: Tuple[object, ...]  # (folder_class, photo path) or None, row by row


@dataclasses.dataclass(frozen=True)
class MosaicSet:
    """What ``build`` wrote."""

    import_file: str
    mosaics: Tuple[Mosaic, ...]
    classes: Tuple[str, ...]  # class folder names, sorted

    def split(self, name: str) -> List[Mosaic]:
        return [m for m in self.mosaics if m.split == name]

    def photos(self, split: str) -> Dict[str, List[str]]:
        """Class folder -> the distinct photos inside ``split``'s mosaics, sorted."""
        used = collections.defaultdict(set)
        for mosaic in self.split(split):
            for tile in mosaic.tiles:
                if tile:
                    used[tile[0]].add(tile[1])
        return {c: sorted(used[c]) for c in self.classes}

    def shared_photos(self) -> List[str]:
        """Photos inside the mosaics of more than one split (none, by construction)."""
        seen = collections.Counter(
            path for split in ML_USE for paths in self.photos(split).values() for path in paths)
        return sorted(path for path, splits in seen.items() if splits > 1)

    def stats(self) -> Dict:
        """Per split: mosaics, label counts, label-set counts, photos per mosaic, photos used."""
        result = {}
        for split in ML_USE:
            mosaics = self.split(split)
            result[split] = {
                "mosaics": len(mosaics),
                "label_counts": dict(sorted(collections.Counter(
                    label for m in mosaics for label in m.labels).items())),
                "label_sets": dict(sorted(collections.Counter(
                    "+".join(m.labels) for m in mosaics).items())),
                "photos_per_mosaic": dict(sorted(collections.Counter(
                    sum(1 for t in m.tiles if t) for m in mosaics).items())),
                "distinct_photos": {c: len(p) for c, p in self.photos(split).items()},
            }
        return result


def split_photos(source: str, seed: int) -> Dict[str, Dict[str, List[str]]]:
    """split -> class folder -> photo paths: train/ whole, validation/ halved per class."""
    classes = sorted(os.listdir(os.path.join(source, "train")))
    result = {"train": {}, "validation": {}, "test": {}}
    for name in classes:
        result["train"][name] = _files(os.path.join(source, "train", name))
        photos = _files(os.path.join(source, "validation", name))
        random.Random(f"{seed}/halves/{name}").shuffle(photos)
        half = len(photos) // 2
        result["validation"][name] = sorted(photos[:half])
        result["test"][name] = sorted(photos[half:])
    return result


def _files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith("."))


class _Deck:
    """A class's photos dealt without replacement, reshuffled (seeded) when used up."""

    def __init__(self, photos: Sequence[str], seed: str):
        self._photos, self._seed, self._round, self._left = list(photos), seed, 0, []

    def deal(self) -> str:
        if not self._left:
            self._left = list(self._photos)
            random.Random(f"{self._seed}/{self._round}").shuffle(self._left)
            self._round += 1
        return self._left.pop()


def plan(photos: Dict[str, List[str]], count: int, seed: str) -> List[Tuple]:
    """``count`` mosaics' tiles: 4 entries of (class folder, photo) or None."""
    classes = sorted(photos)
    decks = {c: _Deck(photos[c], f"{seed}/deck/{c}") for c in classes}
    choices = [(c,) for c in classes] + [tuple(classes)]
    plans = []
    for index in range(count):
        rng = random.Random(f"{seed}/mosaic/{index}")
        chosen = rng.choice(choices)
        if len(chosen) == 1:
            contents = list(chosen) * rng.randint(1, 4)
        else:
            extra = rng.randint(0, 4 - len(chosen))
            contents = list(chosen) + [rng.choice(chosen) for _ in range(extra)]
        tiles: List[object] = [None] * 4
        for position, name in zip(rng.sample(range(4), len(contents)), contents):
            tiles[position] = (name, decks[name].deal())
        plans.append(tuple(tiles))
    return plans


def draw(tiles: Sequence, size: int):
    """The mosaic of ``tiles`` (row by row) as a ``size`` x ``size`` RGB image."""
    from PIL import Image

    tile = size // 2
    mosaic = Image.new("RGB", (size, size), GREY)
    for position, entry in enumerate(tiles):
        if entry is None:
            continue
        with Image.open(entry[1]) as photo:
            photo = photo.convert("RGB")
            w, h = photo.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                   (h - side) // 2 + side)
            photo = photo.resize((tile, tile), Image.LANCZOS, box=box)
        mosaic.paste(photo, ((position % 2) * tile, (position // 2) * tile))
    return mosaic


def build(source: str, out_dir: str, counts: Dict[str, int], size: int = 224,
          seed: int = 42) -> MosaicSet:
    """Writes ``counts[split]`` mosaics per split into ``out_dir`` with their import file.

    Args:
      source: a folder with train/ and validation/ class folders named in LABELS.
      out_dir: where ``<split>/<n>.jpg``, ``import.jsonl`` and ``mosaics.json`` go.
      counts: mosaics per split, keys train, validation, test.
      size: mosaic side in pixels (tiles are half of it).
      seed: seed of the halves, the decks and every mosaic.

    Returns:
      The written set.
    """
    photos = split_photos(source, seed)
    unknown = set(photos["train"]) - set(LABELS)
    if unknown:
        raise ValueError(f"{source}: class folders {sorted(unknown)} have no label in LABELS.")
    mosaics = []
    for split in ML_USE:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for index, tiles in enumerate(plan(photos[split], counts[split], f"{seed}/{split}")):
            path = os.path.abspath(os.path.join(out_dir, split, f"{index:05d}.jpg"))
            draw(tiles, size).save(path, quality=90)
            labels = tuple(sorted({LABELS[t[0]] for t in tiles if t}))
            mosaics.append(Mosaic(path, split, labels, tiles))
    import_file = os.path.abspath(os.path.join(out_dir, IMPORT_FILE))
    with open(import_file, "w") as f:
        for mosaic in mosaics:
            f.write(json.dumps(import_row(mosaic)) + "\n")
    with open(os.path.join(out_dir, CONTENTS_FILE), "w") as f:
        json.dump([dataclasses.asdict(m) for m in mosaics], f)
    return MosaicSet(import_file, tuple(mosaics), tuple(sorted(photos["train"])))


def import_row(mosaic: Mosaic) -> Dict:
    """The Vertex AI JSON Lines object of one mosaic (multi-label schema)."""
    return {"imageGcsUri": mosaic.path,
            "classificationAnnotations": [{"displayName": label} for label in mosaic.labels],
            "dataItemResourceLabels": {ML_USE_KEY: ML_USE[mosaic.split]}}


def write_reference(source: str, mosaic_set: MosaicSet, out_dir: str) -> str:
    """A single-label split-folder set of links: train/ = the source's train photos,
    validation/ and test/ = the photos inside the validation and test mosaics."""
    for name in mosaic_set.classes:
        os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(source, "train", name)),
                   os.path.join(out_dir, "train", name))
    for split in ("validation", "test"):
        for name, paths in mosaic_set.photos(split).items():
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder)
            for path in paths:
                os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
    return out_dir
