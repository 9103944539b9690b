"""Transfer-learning image classifier trainer for cloud accelerators.

The package pins Keras 2 (``tf_keras``). ``TF_USE_LEGACY_KERAS`` must be set
before TensorFlow is first imported so that ``tf.keras`` and everything loaded
by TensorFlow itself (SavedModel, callbacks) agree on the Keras flavour; this
is the one place that sets it.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
