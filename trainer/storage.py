"""Cloud Storage failures: what TensorFlow's gs:// client retries, and errors that say what failed.

The trainer reads and writes gs:// only through TensorFlow's own filesystem
(``tf.io.gfile``, ``tf.data``, checkpoints, SavedModel), whose client retries
every request itself: HTTP 429 and 5xx replies, connection resets and
timeouts, with exponential back-off. Its settings are environment variables
read once, when TensorFlow is imported (tsl ``gcs_file_system.cc``):

* ``GCS_RETRY_CONFIG_MAX_RETRIES`` (default 10),
  ``GCS_RETRY_CONFIG_INIT_DELAY_TIME_US`` (1 s, doubled per retry, plus up
  to 1 s of jitter), ``GCS_RETRY_CONFIG_MAX_DELAY_TIME_US`` (32 s);
* ``GCS_REQUEST_CONNECTION_TIMEOUT_SECS``, ``GCS_REQUEST_IDLE_TIMEOUT_SECS``,
  ``GCS_READ_REQUEST_TIMEOUT_SECS``, ``GCS_WRITE_REQUEST_TIMEOUT_SECS``.

The defaults ride through minutes of errors, so the trainer adds no retry
loop of its own (tests/test_gcs_faults.py measures each kind of fault with
the retries cut to 2). What it adds is context: when a failure outlasts the
retries, :func:`explain_failures` re-raises it, as the same TensorFlow error
class (so ``recovery.py`` still takes it for transient and restarts), with
what was being written and what state was left behind.
"""

import contextlib

import tensorflow as tf

# Words of TensorFlow's errors from its HTTP client: a storage failure, not a
# failure of the computation (a collective op's, say) inside the same block.
_STORAGE_SIGNS = ("retry attempts failed", "HTTP response code", "libcurl",
                  "Error executing an HTTP request")


def is_storage_failure(error: BaseException) -> bool:
    """Whether a TensorFlow error came from its Cloud Storage (HTTP) client."""
    return isinstance(error, tf.errors.OpError) and any(
        sign in error.message for sign in _STORAGE_SIGNS)


@contextlib.contextmanager
def explain_failures(doing: str, left: str):
    """Re-raises a storage failure inside the block with what failed and what is left.

    Args:
      doing: what the block does, e.g. "Writing shards to gs://b/records".
      left: the state a failure leaves and the way out, e.g. "No manifest was
        written; re-run the same command."
    """
    try:
        yield
    except tf.errors.OpError as e:
        if not is_storage_failure(e):
            raise
        raise type(e)(e.node_def, e.op,
                      f"{doing} failed: Cloud Storage kept failing after TensorFlow's "
                      f"retries (GCS_RETRY_CONFIG_MAX_RETRIES). {left} "
                      f"The storage error: {e.message}") from e
