"""What the user pointed at -> one listing of images, each with its split and class.

The one place that decides a layout and splits unassigned images; both the
trainer (``pipeline.describe``) and ``trainer.prepare`` list through it, so
they split alike, image for image. Accepted (local or gs://):

* **split folders**: ``train/`` + ``validation/`` [+ ``test/``] of class
  folders, under any of the names users write (``SPLIT_ALIASES``: ``train``,
  ``training``; ``val``, ``valid``, ``validation``; ``test``, ``testing``).
  Two folders naming one split are an error naming both.
* **class folders only** (TensorFlow's ``flower_photos``): each class is split
  by ``Options.split_fractions`` (AutoML's 80/10/10 by default), by the seed.
* **Vertex AI import files**: one or several (comma-separated) ``.csv`` /
  ``.jsonl`` files (:mod:`trainer.data.import_files`); rows without ML_USE
  (or ``unassigned``) are split per class like class folders. A row may name
  several labels: the image's ``labels`` hold them all, its ``class_name``
  the first (what splitting per class goes by). Folders are single-label.
* **prepared records** (a ``manifest.json``): detected here
  (``LAYOUT_RECORDS``) and read by ``pipeline``.

Without any test image, ``Options.test_fraction`` of each validation class is
held out as test (the tutorial holds out a fifth of validation;
trainer/data/splitting.py does the splitting). Splits
depend on the seed and on the images alone: each split is ordered by (class,
path) before any hold-out, so a folder and an import file listing the same
images split identically.

Hidden files and OS droppings (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``,
``._*``, ``__MACOSX``) are ignored quietly. Every other file inside a class
folder is listed; whether it is an image is decided by its content later
(:mod:`trainer.data.screen` for the trainer, prepare's own check). Files
outside class folders are listed as stray. A class folder holding folders is
an error naming it, unless ``Options.flatten_nested`` asks for their files.
"""

import collections
import dataclasses
from typing import Dict, Iterable, List, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer.data import import_files
from trainer.data import splitting

SPLITS = splitting.SPLITS
held_out = splitting.held_out  # (kept, held-out) indices per label; pipeline uses it.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation",
                 "valid": "validation", "validation": "validation", "test": "test",
                 "testing": "test"}
MANIFEST = "manifest.json"  # records.MANIFEST; records imports TensorFlow's schema only.
LAYOUT_RECORDS = "records"
LAYOUT_SPLITS = "splits"
LAYOUT_CLASS_FOLDERS = "class_folders"
LAYOUT_IMPORT_FILES = "import_files"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# Dropped silently wherever they are (compared lower-case); so is any name starting with ".".
OS_DROPPINGS = ("thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db")


class DataError(ValueError):
    """The data cannot be trained on; the message says why and where."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How to list and split; fields are flags of the trainer and of prepare."""

    split_fractions: Tuple[float, float, float] = DEFAULT_FRACTIONS
    test_fraction: float = 0.2
    seed: int = 42
    strict: bool = False
    flatten_nested: bool = False


@dataclasses.dataclass(frozen=True)
class Image:
    """One listed file: where it is, its split and class, and where it came from."""

    path: str
    split: str
    class_name: str
    relative: str  # to the data folder, or the URI as the import file resolves it
    origin: str = ""  # "file:line" of an import row
    labels: Tuple[str, ...] = ()  # every label of a multi-label row; () means (class_name,)

    @property
    def all_labels(self) -> Tuple[str, ...]:
        return self.labels or (self.class_name,)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bad import row (``where`` = "file:line") or a stray file, and why."""

    where: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """Everything a data source holds, decided once."""

    layout: str
    summary: str  # the one log line
    class_names: Tuple[str, ...]
    images: Tuple[Image, ...]
    bad_rows: Tuple[Problem, ...] = ()
    stray: Tuple[str, ...] = ()

    def split(self, name: str) -> List[Image]:
        return [image for image in self.images if image.split == name]

    def label(self, image: Image) -> int:
        return self.class_names.index(image.class_name)

    def label_set(self, image: Image) -> Tuple[int, ...]:
        """Indices of every label of ``image`` (one for a single-label image)."""
        return tuple(self.class_names.index(name) for name in image.all_labels)

    @property
    def multi_label(self) -> bool:
        """Whether any training image has more than one label (what --task=auto reads)."""
        return any(len(i.all_labels) > 1 for i in self.images if i.split == "train")


def is_ignored(name: str) -> bool:
    """Hidden files and OS droppings: never images, never reported."""
    name = name.rstrip("/")
    return name.startswith(".") or name.lower() in OS_DROPPINGS


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name.rstrip('/')}"


def _entries(folder: str) -> Tuple[List[str], List[str]]:
    """(sorted subfolder names, sorted file names) of a folder, ignored names left out."""
    folders, files = [], []
    for name in sorted(tf.io.gfile.listdir(folder)):
        name = name.rstrip("/")
        if not is_ignored(name):
            (folders if tf.io.gfile.isdir(_join(folder, name)) else files).append(name)
    return folders, files


def _split_folders(root: str, folders: Sequence[str]) -> Dict[str, str]:
    """split -> folder name, by SPLIT_ALIASES; two folders for one split are an error."""
    found: Dict[str, str] = {}
    for name in folders:
        split = SPLIT_ALIASES.get(name.lower())
        if split is None:
            continue
        if split in found:
            raise DataError(f"{root}: both {found[split]}/ and {name}/ name the {split} "
                            "split; keep one.")
        found[split] = name
    return found


def detect_layout(data: str) -> str:
    """The layout of ``data``, from its name and one listing of its top folder.

    Raises:
      DataError: nothing there, or no layout fits (the message says what was found).
    """
    names = import_files.split_names(data)
    if names and all(import_files.is_import_file(n) for n in names):
        for name in names:
            if not tf.io.gfile.exists(name):
                raise DataError(f"import file {name!r}: no such file.")
        return LAYOUT_IMPORT_FILES
    if len(names) > 1 or any(import_files.is_import_file(n) for n in names):
        raise DataError(f"{data!r}: several paths must all be import files (.csv, .jsonl).")
    root = data.rstrip("/")
    if not tf.io.gfile.isdir(root):
        raise DataError(f"{root!r}: no such folder.")
    if tf.io.gfile.exists(_join(root, MANIFEST)):
        return LAYOUT_RECORDS
    folders, _ = _entries(root)
    splits = _split_folders(root, folders)
    if splits:
        for needed, aliases in (("train", "train/ or training/"),
                                ("validation", "val/, valid/ or validation/")):
            if needed not in splits:
                raise DataError(f"{root} has {', '.join(f + '/' for f in splits.values())} "
                                f"but no {needed} folder ({aliases}).")
        return LAYOUT_SPLITS
    if len(folders) < 2:
        raise DataError(
            f"{root} holds neither split folders (train/ and validation/, or their "
            f"aliases) nor two or more class folders; found folders {folders}.")
    return LAYOUT_CLASS_FOLDERS


def list_images(data: str, options: Options = Options()) -> Listing:
    """Lists ``data`` (a folder or import files) into one Listing; logs its summary line.

    Raises:
      DataError: no usable layout, a nested class folder, or (with ``options.strict``) the first bad row.
    """
    layout = detect_layout(data)
    if layout == LAYOUT_RECORDS:
        raise DataError(f"{data!r} holds prepared records ({MANIFEST}); read them with "
                        "trainer.data.pipeline.")
    if layout == LAYOUT_IMPORT_FILES:
        listing = _list_import_files(data, options)
    else:
        listing = _list_folders(data.rstrip("/"), layout, options)
    logging.info("%s", listing.summary)
    return listing


# ------------------------------------------------------------------ Folders


def _class_files(class_dir: str, flatten: bool) -> List[str]:
    folders, files = _entries(class_dir)
    paths = [_join(class_dir, name) for name in files]
    if folders and not flatten:
        raise DataError(
            f"class folder {class_dir} holds folders ({', '.join(folders)}): nested class "
            "folders are not classes. Move their images up, or pass --flatten_nested to "
            "take their files as images of this class.")
    for name in folders:
        paths += _class_files(_join(class_dir, name), flatten)
    return paths


def _list_folders(root: str, layout: str, options: Options) -> Listing:
    folders, files = _entries(root)
    stray = [_join(root, name) for name in files]
    if layout == LAYOUT_SPLITS:
        split_dirs = _split_folders(root, folders)
        stray += [_join(root, f) for f in folders if f not in split_dirs.values()]
    else:
        split_dirs = {"": ""}
    images, classes = [], set()
    for split, name in split_dirs.items():
        folder = _join(root, name) if name else root
        class_dirs, split_files = _entries(folder)
        if name:
            stray += [_join(folder, f) for f in split_files]
        classes.update(class_dirs)
        for class_name in class_dirs:
            for path in _class_files(_join(folder, class_name), options.flatten_nested):
                images.append(Image(path, split, class_name, path[len(root) + 1:]))
    class_names = tuple(sorted(classes))
    images = splitting.assign(images, class_names, options)
    if layout == LAYOUT_SPLITS:
        named = ", ".join(f"{n}/" + (f" (alias of {s})" if n != s else "")
                          for s, n in sorted(split_dirs.items(), key=lambda i: SPLITS.index(i[0])))
        what = f"split folders {named}"
    else:
        what = ("class folders only, split {:g}/{:g}/{:g} per class by seed {}".format(
            *(100 * f for f in options.split_fractions), options.seed))
    return Listing(layout, _summary(what, class_names, images, stray=stray), class_names,
                   tuple(images), (), tuple(stray))


# ------------------------------------------------------------- Import files


def _list_import_files(data: str, options: Options) -> Listing:
    names = import_files.split_names(data)
    rows, bad = [], []
    for name in names:
        file_rows, file_bad = import_files.read_rows(name)
        rows += file_rows
        bad += [Problem(b.where, b.reason) for b in file_bad]
    rows, conflicts = _deduplicate(rows)
    bad += conflicts
    rows, missing = _existing(rows)
    bad += missing
    images = [Image(r.uri, r.split, r.label, r.uri, r.where,
                    r.labels if len(r.labels) > 1 else ()) for r in rows]
    class_names = tuple(sorted({name for image in images for name in image.all_labels}))
    images = splitting.assign(images, class_names, options)
    images, class_names, untrained_rows = _drop_untrained(images, class_names)
    bad += untrained_rows
    if untrained_rows:  # A multi-label image may have a new first label: keep the order.
        index = {name: k for k, name in enumerate(class_names)}
        images.sort(key=lambda i: (SPLITS.index(i.split), index[i.class_name], i.path))
    bad = sorted(bad, key=lambda p: _line_order(p.where, names))
    if bad and options.strict:
        raise DataError(f"{bad[0].where}: {bad[0].reason} (--strict stops at the first bad "
                        f"row; {len(bad)} in all).")
    for problem in bad[:10]:
        logging.warning("Skipped %s: %s", problem.where, problem.reason)
    if len(bad) > 10:
        logging.warning("... %d more bad rows skipped, see the data report.", len(bad) - 10)
    kinds = "/".join(sorted({n.rsplit(".", 1)[-1].upper() for n in names}))
    what = f"import file{'s' if len(names) > 1 else ''} ({kinds}) {', '.join(names)}"
    return Listing(LAYOUT_IMPORT_FILES, _summary(what, class_names, images, bad=bad),
                   class_names, tuple(images), tuple(bad), ())


def _drop_untrained(images: Sequence[Image], class_names: Sequence[str]):
    """(images, class names, problems) without labels that no training image has.

    A single-label row of such a label is dropped; a multi-label row loses
    that label (and is dropped when none is left).
    """
    trained = {name for i in images if i.split == "train" for name in i.all_labels}
    kept, bad = [], []
    for image in images:
        labels = [name for name in image.all_labels if name in trained]
        for name in image.all_labels:
            if name not in trained:
                bad.append(Problem(image.origin, f"label {name!r} has no training image"))
        if labels:
            kept.append(dataclasses.replace(image, class_name=labels[0],
                                            labels=tuple(labels) if len(labels) > 1 else ()))
    return kept, tuple(c for c in class_names if c in trained), bad


def _line_order(where: str, names: Sequence[str]):
    name, _, line = where.rpartition(":")
    return (names.index(name) if name in names else len(names), int(line) if line.isdigit() else 0)


def _deduplicate(rows: Sequence[import_files.Row]):
    """Rows with each URI once; a URI given with different labels is dropped, each row reported.

    Labels compare as sets: ``a,b`` and ``b,a`` are one image's labels.
    """
    by_uri: Dict[str, List[import_files.Row]] = collections.defaultdict(list)
    for row in rows:
        by_uri[row.uri].append(row)
    kept, bad = [], []
    for uri, group in by_uri.items():
        labels = sorted({tuple(sorted(r.labels)) for r in group})
        if len(labels) > 1:
            labels = [",".join(label_set) for label_set in labels]
            lines = ", ".join(r.where for r in group)
            bad += [Problem(r.where, f"{uri} has conflicting labels {labels} ({lines})")
                    for r in group]
        else:
            kept.append(group[0])  # Same label again: AutoML keeps one; so do we.
    return kept, bad


def _existing(rows: Sequence[import_files.Row]):
    """Rows whose file exists: one listing per folder, not one request per image."""
    by_folder: Dict[str, set] = {}
    kept, bad = [], []
    for row in rows:
        folder, _, name = row.uri.rpartition("/")
        if folder not in by_folder:
            try:
                by_folder[folder] = {n.rstrip("/") for n in tf.io.gfile.listdir(folder)}
            except tf.errors.NotFoundError:
                by_folder[folder] = set()
        if name in by_folder[folder]:
            kept.append(row)
        else:
            bad.append(Problem(row.where, f"missing file {row.uri}"))
    return kept, bad


def _summary(what: str, class_names: Sequence[str], images: Iterable[Image],
             bad: Sequence[Problem] = (), stray: Sequence[str] = ()) -> str:
    counts = collections.Counter(i.split for i in images)
    shown = [s for s in SPLITS if counts[s]]
    line = (f"layout: {what}; {len(class_names)} classes; "
            f"{'/'.join(str(counts[s]) for s in shown)} images ({'/'.join(shown)})")
    if bad:
        line += f"; {len(bad)} bad rows skipped"
    if stray:
        line += f"; {len(stray)} file(s) outside class folders ignored"
    return line
