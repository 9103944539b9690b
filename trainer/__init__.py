"""Transfer-learning image classifier trainer for cloud accelerators.

Importing the package sets, unless already set, the environment that
TensorFlow reads once, when it is first imported; this is the one place that
sets it:

* ``TF_USE_LEGACY_KERAS=1``: the package pins Keras 2 (``tf_keras``), and
  ``tf.keras`` and everything loaded by TensorFlow itself (SavedModel,
  callbacks) must agree on the Keras flavour.
* ``GCS_READ_CACHE_BLOCK_SIZE_MB=16``: TensorFlow's gs:// client reads a file
  through a buffer of this size, zero-filled when a file is opened. Its
  default, 64 MB, cost more CPU than decoding saves on shards of a few MB:
  16 MB took the gs:// first epoch from 0.75x to 0.84x the local one
  (benchmarks/results/input_pipeline.md, docs/data.md), and still reads a
  200 MB shard in 13 requests.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("GCS_READ_CACHE_BLOCK_SIZE_MB", "16")
