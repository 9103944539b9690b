"""The content address of a cached frozen output: everything that output depends on.

An entry of the cache store (trainer/cache_store.py) holds what the frozen
layers computed for a data listing: pooled features (phase 1) or frontier
activations (phase 2), of the images or of their mirror images. Its key
names every input of that computation, so that one key means one output:

* ``kind``: ``pooled`` or ``frontier``; ``view``: ``original`` or
  ``flipped`` (the flip views of phase 2's random flip);
* ``backbone`` and ``weights``: the backbone's name and the SHA-256 of its
  weight values as loaded (which covers the weights file's content,
  ImageNet's download and a random initialisation's seed alike);
* ``image_size``, ``fine_tune_at`` (frontier only: pooled features do not
  depend on where phase 2 cuts), ``dtype`` (the compute dtype under mixed
  precision), ``folding`` (the BatchNorm folding of trainer/folding.py);
* ``data``: per split, the SHA-256 of the exact listing -- each image's
  content hash and label, in order -- or of a prepared manifest and its
  shards' sizes; a multi-label task's listing hashes each image's label set
  and the labels' form (k-hot over k classes), since entries store labels;
* ``tensorflow``: the TensorFlow and Keras versions; ``format``: this
  store's record layout and the pipeline's decode/resize, bumped when
  either changes.

Flags that change only training (learning rates, dropout, epochs, batch
size, optimizers, the seed under a weights file) are not inputs, so tuning
trials that differ in them share entries.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
from typing import Dict, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras as keras

from trainer import folding

# Bump when the record layout of cache_store.py or the decode/resize of
# trainer/data/pipeline.py (or its extraction batch) changes what is stored.
FORMAT = 1
KINDS = ("pooled", "frontier")
VIEWS = ("original", "flipped")
_HASH_THREADS = 16  # Image files read at once while hashing (gs:// latency).


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """Every input of one cached frozen output; ``digest`` is its address."""

    kind: str
    view: str
    backbone: str
    weights: str
    image_size: int
    fine_tune_at: Optional[int]
    dtype: str
    data: Mapping[str, str]
    folding: int
    tensorflow: str
    format: int = FORMAT

    def fields(self) -> Dict:
        values = dataclasses.asdict(self)
        values["data"] = dict(sorted(self.data.items()))
        return values

    @property
    def digest(self) -> str:
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """The entry's folder name: readable kind and view, then the address."""
        return f"{self.kind}-{self.view}-{self.digest[:40]}"


def make_key(kind: str, view: str, backbone: str, weights_digest: str, image_size: int,
             fine_tune_at: int, data: Mapping[str, str]) -> CacheKey:
    """The key of one entry; ``fine_tune_at`` is dropped for pooled features."""
    if kind not in KINDS or view not in VIEWS:
        raise ValueError(f"kind {kind!r} / view {view!r}: must be in {KINDS} / {VIEWS}.")
    return CacheKey(kind=kind, view=view, backbone=backbone, weights=weights_digest,
                    image_size=image_size,
                    fine_tune_at=fine_tune_at if kind == "frontier" else None,
                    dtype=keras.mixed_precision.global_policy().compute_dtype,
                    data=dict(data), folding=folding.VERSION,
                    tensorflow=f"{tf.__version__}/keras-{keras.__version__}")


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of a model's weight values (names, shapes, dtypes and bytes), in order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = weight.numpy()
        digest.update(f"{weight.name}|{value.shape}|{value.dtype}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def listing_digest(split) -> str:
    """SHA-256 of a split's exact listing (a ``pipeline.Split``).

    Image files: each file's content hash and label, in listing order (the
    order the entry's records follow); paths are left out, so a moved copy
    of the same data keeps its key. The content hashes are the split's
    ``digests`` when trainer/data/screen.py gave them for exactly these
    paths (the bytes it read and checked moments before), else each file
    is read and hashed here.
    Prepared records: the manifest's bytes and each shard's name and size.
    """
    digest = hashlib.sha256(f"{split.name}|{split.count}|".encode())
    if split.multi_hot:  # The stored labels' form; single-label keys stay as they were.
        digest.update(f"k_hot:{split.multi_hot}|".encode())
    if split.is_records:
        with tf.io.gfile.GFile(split.manifest, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
        for shard in split.shards:
            digest.update(f"{shard.rsplit('/', 1)[-1]}|{tf.io.gfile.stat(shard).length}|"
                          .encode())
        return digest.hexdigest()
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        screened = tuple(p for p, _ in split.digests) == split.paths
        hashes = ([d for _, d in split.digests] if screened
                  else pool.map(_file_digest, split.paths))
        labels = (split.label_sets or split.labels) if split.multi_hot else split.labels
        for content, label in zip(hashes, labels):
            digest.update(content + f"|{label}|".encode())
    return digest.hexdigest()


def _file_digest(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def data_digests(splits: Sequence) -> Dict[str, str]:
    """{split name: listing_digest} of several splits."""
    return {split.name: listing_digest(split) for split in splits}
