"""The raw-file path's check before training: every listed file read once and decoded by Pillow.

A training job that reads image files (not prepared records) first reads and
decodes each of them with :func:`trainer.data.images.check_image`, the check
``trainer.prepare`` makes, so that no unreadable, truncated or non-image file
(by content, whatever its name) can crash a job mid-epoch:

* a file that is not a usable image is dropped and reported by path; so is
  one whose header gives more than ``--max_image_pixels`` pixels (a
  decompression bomb), without being decoded;
* an image that prepare would convert (PNG, GIF, BMP, grayscale or CMYK
  JPEG, ...) is converted the same way, into a local folder of converted
  copies that the listing then points at. TensorFlow decodes the converted
  JPEG, so training sees exactly the pixels of prepare's records (its own
  ``decode_image`` differs: a palette BMP decodes to other colours);
* an RGB JPEG is left where it is.

The time the check took is logged; the report (also the import file's bad
rows and the stray files) is written as JSON into the job dir.

Each kept file's content SHA-256 (of the bytes checked; of the copy for a
converted one) comes back in its split's ``digests``, so the frozen-work
cache key (trainer/cache_key.py) does not read the files again. With a
``memo_dir`` (``--cache_dir``), files whose content was found usable before
are not decoded again (trainer/data/screen_memo.py): a tuning trial or a
rerun on the same data skips the decode, never the report of a bad file.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Dict, FrozenSet

import tensorflow as tf
from absl import logging

from trainer.data import images
from trainer.data import pipeline
from trainer.data import screen_memo

REPORT = "data_report.json"
_THREADS = 16  # Reads wait on storage; Pillow's decoders release the GIL.


@dataclasses.dataclass(frozen=True)
class _Outcome:
    path: str
    status: str
    reason: str = ""
    converted: str = ""  # the converted copy's path
    digest: bytes = b""  # SHA-256 of what training reads: the file, or its copy
    remembered: bool = False  # usable by the memo: not decoded again


def _check_one(path: str, converted_dir: str, max_pixels: int,
               usable: FrozenSet[str] = frozenset()) -> _Outcome:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        return _Outcome(path, images.SKIPPED, f"cannot read: {message}")
    digest = hashlib.sha256(data).digest()
    if digest.hex() in usable:
        return _Outcome(path, images.OK, digest=digest, remembered=True)
    checked = images.check_image(data, max_pixels=max_pixels)
    if checked.status == images.SKIPPED:
        return _Outcome(path, images.SKIPPED, checked.reason)
    if checked.status == images.OK:
        return _Outcome(path, images.OK, digest=digest)
    copy = os.path.join(converted_dir, digest.hex() + ".jpg")
    with open(copy, "wb") as f:
        f.write(checked.encoded)
    return _Outcome(path, images.CONVERTED, checked.reason, copy,
                    hashlib.sha256(checked.encoded).digest())


def screen(info: pipeline.DatasetInfo, data_dir: str, report_path: str = "",
           converted_dir: str = "",
           max_pixels: int = images.DEFAULT_MAX_PIXELS,
           memo_dir: str = "") -> pipeline.DatasetInfo:
    """Checks every file of ``info``; returns it without the unusable ones, converted
    ones pointing at their copies. Prepared records are returned as they are.

    Args:
      info: a listing of image files (``pipeline.describe``).
      data_dir: what it was listed from, for messages and the report.
      report_path: where to write the JSON report ('' writes none: non-chief workers).
      converted_dir: a local folder for converted copies; '' makes a temporary one.
      max_pixels: an image whose header gives more pixels is skipped undecoded
        (``--max_image_pixels``).
      memo_dir: a folder (``--cache_dir``, local or gs://) where the digests of
        usable files are remembered across jobs; '' remembers nothing.

    Raises:
      DataError: what is left leaves a class without train or validation images.
    """
    if any(split.is_records for split in info.splits.values()):
        return info
    paths = sorted({p for split in info.splits.values() for p in split.paths})
    converted_dir = converted_dir or tempfile.mkdtemp(prefix="converted_images_")
    os.makedirs(converted_dir, exist_ok=True)
    start = time.perf_counter()
    memo = screen_memo.memo_path(memo_dir, paths, max_pixels) if memo_dir else ""
    usable = screen_memo.load(memo, max_pixels) if memo else frozenset()
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        outcomes = {o.path: o for o in pool.map(
            lambda p: _check_one(p, converted_dir, max_pixels, usable), paths)}
    seconds = time.perf_counter() - start
    skipped = [o for o in outcomes.values() if o.status == images.SKIPPED]
    converted = [o for o in outcomes.values() if o.status == images.CONVERTED]
    remembered = sum(o.remembered for o in outcomes.values())
    logging.info("Checked %d files in %.1f s: %d skipped (not usable images), %d converted "
                 "to RGB JPEG as prepare converts them%s.", len(paths), seconds, len(skipped),
                 len(converted), f"; {remembered} known usable by content, not decoded again"
                 if remembered else "")
    found = {o.digest.hex() for o in outcomes.values()
             if o.status == images.OK and not o.remembered}
    if memo and found:
        screen_memo.save(memo, usable | found, max_pixels)
    for outcome in skipped[:10]:
        logging.warning("Skipped %s: %s", outcome.path, outcome.reason)
    if len(skipped) > 10:
        logging.warning("... %d more skipped, see %s.", len(skipped) - 10, report_path or REPORT)
    screened = dataclasses.replace(info, splits={
        name: _screened(split, outcomes) for name, split in info.splits.items()})
    if report_path:
        write_report(report_path, _report(info, screened, data_dir, outcomes, seconds))
    pipeline.check_classes(screened, data_dir)
    return screened


def _screened(split: pipeline.Split, outcomes: Dict[str, _Outcome]) -> pipeline.Split:
    kept = [k for k, path in enumerate(split.paths) if outcomes[path].status != images.SKIPPED]
    split = split.subset(kept)
    paths = tuple(outcomes[p].converted or p for p in split.paths)
    return dataclasses.replace(split, paths=paths,
                               digests=tuple((c, outcomes[p].digest)
                                             for p, c in zip(split.paths, paths)))


def _report(info: pipeline.DatasetInfo, screened: pipeline.DatasetInfo, data_dir: str,
            outcomes: Dict[str, _Outcome], seconds: float) -> Dict:
    listing = info.listing
    split_of = {p: name for name, split in info.splits.items() for p in split.paths}

    def entries(status):
        return [{"path": o.path, "split": split_of[o.path], "reason": o.reason}
                for o in outcomes.values() if o.status == status]

    skipped, converted = entries(images.SKIPPED), entries(images.CONVERTED)
    bad_rows = [{"where": p.where, "reason": p.reason} for p in (listing.bad_rows if listing
                                                                 else ())]
    stray = list(listing.stray) if listing else []
    return {
        "data_dir": data_dir,
        "layout": listing.layout if listing else "",
        "summary_line": listing.summary if listing else "",
        "class_names": list(info.class_names),
        "counts": {name: split.count for name, split in screened.splits.items()},
        "check_seconds": round(seconds, 3),
        "summary": {"files": len(outcomes), "skipped": len(skipped),
                    "known_usable": sum(o.remembered for o in outcomes.values()),
                    "converted": len(converted), "bad_rows": len(bad_rows),
                    "stray": len(stray)},
        "skipped": skipped, "converted": converted, "bad_rows": bad_rows, "stray": stray,
    }


def write_report(path: str, report: Dict) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(report, f, indent=2)
