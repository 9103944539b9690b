"""What a run needs from outside, checked before any data is read: weights and Cloud Storage.

The first errors a new user meets used to come late and raw: offline, the
default ``--weights=imagenet`` died inside Keras with ``URL fetch failure on
https://storage.googleapis.com/...``; a gs:// path in a bucket that does not
exist, or without credentials, gave TensorFlow's terse error (or, for an
output folder, nothing until the first write, after the training). Each is
now one message naming the flag or path and the way out, raised before
anything is built: ``check_run``, which ``trainer/task.py`` calls right after
parsing the flags (``config.validate`` stays offline; it asks
``check_gcs_paths`` only to explain a gs:// path it did not find):

* ``check_imagenet_weights``: Keras keeps downloaded weights in
  ``~/.keras/models`` (``tf_keras`` ignores ``KERAS_HOME``). When the file a
  backbone needs is not there, one HEAD request to its download address must
  get an answer; otherwise the way out is a local weights file, the file put
  into that folder, or ``--weights=none``. ``explain_weights_download`` turns
  a download that fails later (another input side) into the same message.
* ``check_gcs_paths``: TensorFlow finds no credentials quietly: it logs a
  warning after trying the metadata server and sends requests anonymously,
  which Cloud Storage answers with 401 on a private bucket (measured with TF
  2.21: 8 s of retries, then the anonymous request). And
  ``tf.io.gfile.exists`` is simply False in a bucket that does not exist. So
  each gs:// path is probed once: a 401/403 names the path and either
  ``gcloud auth application-default login`` (no credentials found, by the
  same search google-auth makes) or the missing permission; a missing path
  in a missing bucket names the bucket.
"""

import contextlib
import os
import urllib.error
import urllib.request
from typing import Dict, Iterable, List, Sequence

import tensorflow as tf

from trainer import config as config_lib
from trainer import recipe

KERAS_CACHE = os.path.join("~", ".keras", "models")  # Where tf_keras keeps downloads.
_TIMEOUT_S = 10


class PreflightError(config_lib.ConfigError):
    """Something outside the trainer that the run needs is missing; the message says what."""


def check_run(config: config_lib.Config) -> None:
    """Every check of this module a training run needs; the entry point calls it.

    Raises:
      PreflightError: the first problem found, naming its flag or path.
    """
    from trainer import model as model_lib  # Keras: only where weights are checked.

    check_gcs_paths(_gcs_paths(config))
    if config.weights == "imagenet":
        native = model_lib.BACKBONES[config.backbone].native_size
        may_choose_native = (config.recipe == recipe.AUTO and native
                             and "image_size" not in config.recipe_pinned)
        check_imagenet_weights(config.backbone,
                               [config.image_size] + ([native] if may_choose_native else []))


def _gcs_paths(config: config_lib.Config) -> Dict[str, str]:
    """Label -> path of every place the run reads or writes (the label names the flag)."""
    parts = config.data_dir.split(",")
    paths = {"--data_dir" + (f"[{i}]" if len(parts) > 1 else ""): part
             for i, part in enumerate(parts)}
    paths.update({"--job_dir": config.job_dir, "--weights": config.weights})
    for name, env in (("model_dir", "AIP_MODEL_DIR"), ("checkpoint_dir", "AIP_CHECKPOINT_DIR"),
                      ("log_dir", "AIP_TENSORBOARD_LOG_DIR")):
        path = getattr(config, name)
        if not path.startswith(config.job_dir + "/"):
            paths[env] = path
    if config.cache not in (config_lib.CACHE_MEMORY, config_lib.CACHE_NONE):
        paths["--cache"] = config.cache
    return paths


# ------------------------------------------------------------------- Weights


def imagenet_files(backbone: str, image_sizes: Iterable[int]) -> List[str]:
    """Download paths (relative to model.IMAGENET_URL) of the files a run may load."""
    from trainer import model as model_lib

    spec = model_lib.BACKBONES[backbone]
    return sorted({spec.imagenet_file_for(size) for size in image_sizes} - {""})


def check_imagenet_weights(backbone: str, image_sizes: Sequence[int]) -> None:
    """Raises PreflightError unless the backbone's ImageNet weights are cached or reachable."""
    from trainer import model as model_lib

    if not model_lib.BACKBONES[backbone].imagenet_file:
        raise PreflightError(f"--weights=imagenet: --backbone={backbone} has no ImageNet "
                             "weights; use --weights=none or a Keras weights file.")
    missing = [f for f in imagenet_files(backbone, image_sizes) if not os.path.exists(
        os.path.join(os.path.expanduser(KERAS_CACHE), os.path.basename(f)))]
    if not missing:
        return
    url = model_lib.IMAGENET_URL + missing[0]
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError:
        return  # The server answered: Keras's own download reports anything else.
    except (urllib.error.URLError, OSError) as e:
        raise PreflightError(offline_message(backbone, missing, str(getattr(e, "reason", e))))


def offline_message(backbone: str, files: Sequence[str], reason: str) -> str:
    from trainer import model as model_lib

    names = ", ".join(os.path.basename(f) for f in files)
    return (f"--weights=imagenet: the ImageNet weights of {backbone} are not in Keras's "
            f"cache ({KERAS_CACHE}) and cannot be downloaded from "
            f"{model_lib.IMAGENET_URL} ({reason}). Offline, either pass "
            f"--weights=/path/to/weights.h5 (a Keras weights file of the backbone without "
            f"its top, local or gs://), or copy {names} into {KERAS_CACHE}/, or use "
            f"--weights=none (random weights: not a transfer).")


@contextlib.contextmanager
def explain_weights_download(backbone: str, image_size: int):
    """Turns Keras's ``URL fetch failure`` while downloading weights into offline_message."""
    try:
        yield
    except Exception as e:  # Keras raises a plain Exception.
        if not str(e).startswith("URL fetch failure"):
            raise
        raise PreflightError(offline_message(backbone, imagenet_files(backbone, [image_size]),
                                             str(e).split(" -- ")[-1])) from None


# ------------------------------------------------------------- Cloud Storage


def check_gcs_paths(paths: Dict[str, str]) -> None:
    """Raises PreflightError for a gs:// path whose bucket is missing or refuses access.

    Args:
      paths: label (the flag, e.g. ``--job_dir``, or the variable) -> path;
        non-gs:// paths are skipped. A path need not exist (an output folder),
        its bucket must.
    """
    for label, path in paths.items():
        if path.startswith("gs://"):
            _check_gcs_path(label, path)


def _check_gcs_path(label: str, path: str) -> None:
    bucket = path[len("gs://"):].split("/", 1)[0]
    try:
        if tf.io.gfile.exists(path):
            return
    except tf.errors.OpError as e:
        _raise_for(label, path, bucket, e)
    try:  # Not there (an output folder may not be yet): is its bucket?
        tf.io.gfile.stat(f"gs://{bucket}")
    except tf.errors.NotFoundError as e:
        raise PreflightError(
            f"{label}={path}: the bucket gs://{bucket} does not exist (TensorFlow: "
            f"{_first_line(e)}). Check the name, or create it: "
            f"gcloud storage buckets create gs://{bucket} --location=REGION.") from None
    except tf.errors.OpError:
        # Reading a bucket's metadata needs storage.buckets.get, which accounts with
        # object roles alone lack: no verdict, the run goes on.
        pass


def _raise_for(label: str, path: str, bucket: str, e: tf.errors.OpError) -> None:
    message = _first_line(e)
    if not any(code in message for code in ("401", "403")) and not isinstance(
            e, (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError)):
        raise PreflightError(f"{label}={path}: Cloud Storage error: {message}") from None
    raise PreflightError(_access_message(label, path, bucket, message)) from None


def _access_message(label: str, path: str, bucket: str, message: str) -> str:
    found = credentials_found()
    if not found:
        return (f"{label}={path}: Cloud Storage refused access, and no Google Cloud "
                f"credentials were found, so TensorFlow sent the request anonymously "
                f"({message}). Run `gcloud auth application-default login` (or set "
                f"GOOGLE_APPLICATION_CREDENTIALS to a service-account key file); on "
                f"Vertex AI the job runs as its service account.")
    return (f"{label}={path}: Cloud Storage refused access with the credentials found "
            f"({found}): {message}. Grant that account access to gs://{bucket} (e.g. "
            f"roles/storage.objectAdmin), or run `gcloud auth application-default login` "
            f"as one that has it.")


def credentials_found() -> str:
    """What TensorFlow's gs:// client would authenticate with ('' when nothing).

    The same search as TensorFlow's: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    application-default file, the metadata server; google-auth makes it.
    """
    if os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        return "GOOGLE_AUTH_TOKEN_FOR_TESTING"
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return ""
    return type(credentials).__module__ + "." + type(credentials).__name__


def _first_line(error: tf.errors.OpError) -> str:
    return next((line.strip() for line in error.message.splitlines() if line.strip()), "")
