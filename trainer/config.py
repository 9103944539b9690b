"""The resolved ``Config`` of a run: presets, validation, output folders.

The flags themselves are defined in ``trainer/flag_definitions.py``.

Flag defaults reproduce the reference recipe (TensorFlow's transfer-learning
tutorial): MobileNetV2 at 160x160, batch 32 per replica, 10 frozen epochs with
Adam 1e-4, then 10 epochs from layer 100 on with RMSprop 1e-5.

Only ``task.py`` (and the other command-line modules) parse flags; everything
below them takes the ``Config`` built here. This module and ``cluster.py`` are
the only ones that read environment variables (Vertex AI's ``AIP_*``).
"""

import dataclasses
import json
import os
from typing import Mapping, Optional, Tuple

from absl import flags

from trainer import recipe as recipe_lib
from trainer.flag_definitions import (  # noqa: F401  (re-exported)
    CACHE_MEMORY, CACHE_NONE, MIXED_PRECISION_POLICIES, OPTIMIZERS, STRATEGIES, define_flags)

# --weights value of the demo: pre-train the backbone on the generated source task.
DEMO_SOURCE_WEIGHTS = "demo_source"

# The demo trains on generated shapes with a small backbone pre-trained on a
# generated source task (see trainer/demo.py). These values replace the
# defaults of any flag the user did not set when --data_dir is empty.
DEMO_PRESET = {
    "backbone": "demo_cnn",
    "image_size": 64,
    "batch_size": 32,
    "epochs": 10,
    "fine_tune_epochs": 4,
    "learning_rate": 2e-2,
    "fine_tune_learning_rate": 2e-4,
    "weights": DEMO_SOURCE_WEIGHTS,
    # Its own fixed schedule: the shapes and demo_cnn want rates of their own.
    "recipe": recipe_lib.TUTORIAL,
    # The shapes are drawn at every angle already, and RandomRotation's
    # reflected borders would draw extra shapes into the corners.
    "augment": False,
}


class ConfigError(ValueError):
    """A flag value or path that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs, resolved from flags and the environment."""

    data_dir: str
    job_dir: str
    model_dir: str
    checkpoint_dir: str
    log_dir: str
    image_size: int
    batch_size: int
    epochs: int
    fine_tune_epochs: int
    fine_tune_at: int
    learning_rate: float
    fine_tune_learning_rate: float
    dropout: float
    optimizer: str
    fine_tune_optimizer: str
    backbone: str
    weights: str
    augment: bool
    strategy: str
    tpu: str
    seed: int
    checkpoint_every_steps: int
    test_fraction: float
    cache: str
    shuffle_buffer: int
    demo: bool = False
    # Metric reported to Vertex AI hyperparameter tuning; "" reports nothing.
    hypertune_metric: str = ""
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0
    export_tflite: bool = False
    export_onnx: bool = False
    feature_cache: bool = True
    fine_tune_cache: bool = True
    fine_tune_cache_max_gb: float = 4.0
    cache_dir: str = ""  # Frozen work kept across jobs (trainer/cache_store.py).
    cache_spill_dir: str = ""
    mixed_precision: str = "none"
    jit_compile: bool = False
    max_restarts: int = 3
    restart_wait_seconds: float = 600.0
    # Stuck peers (trainer/watchdog.py): 0 adapts the bound to the measured steps.
    watchdog_seconds: float = 0.0
    watchdog_floor_seconds: float = 300.0
    # A Config built in code runs exactly the epochs and rates it names
    # ("tutorial"); the --recipe flag defaults to "auto" (see trainer/recipe.py).
    recipe: str = recipe_lib.TUTORIAL
    # Under "auto": the recipe knobs (recipe.KNOBS) the user set, which auto keeps.
    recipe_pinned: Tuple[str, ...] = ()
    head_learning_rates: Tuple[float, ...] = recipe_lib.HEAD_LEARNING_RATES
    # Data as users have it (trainer/data/sources.py) and imbalanced classes.
    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    strict: bool = False
    flatten_nested: bool = False
    class_weighting: str = "none"
    # Multi-label classification (trainer/multi_label.py): the task, and one global
    # decision threshold instead of per-class ones chosen on validation (None).
    task: str = "auto"
    multi_label_threshold: Optional[float] = None
    # Hostile input and job-dir safety (issue 15): trainer/data/images.py, resume_guard.py.
    max_image_pixels: int = 89_478_485
    discard_backups: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                      environ: Optional[Mapping[str, str]] = None,
                      check_paths: bool = True) -> Config:
    """Builds and validates the Config of a run from parsed flags.

    ``check_paths=False`` skips the checks that touch --data_dir and
    --weights (the offline spec validator cannot reach gs://).
    """
    environ = os.environ if environ is None else environ
    values = {name: flag_values[name].value for name in _flag_names()}
    values["split_fractions"] = _numbers("split_fractions", values["split_fractions"],
                                         "0.8,0.1,0.1")
    demo = not values["data_dir"]
    preset = set()
    if demo:
        for name, value in DEMO_PRESET.items():
            if not flag_values[name].present:
                values[name] = value
                preset.add(name)
    values["head_learning_rates"] = _numbers("head_learning_rates",
                                            values["head_learning_rates"], "1e-3,1e-2")
    values["recipe_pinned"] = tuple(knob for knob in recipe_lib.KNOBS
                                    if flag_values[knob].present or knob in preset)
    if not flag_values["fine_tune_at"].present:
        values["fine_tune_at"] = _default_fine_tune_at(values["backbone"])
    dirs = resolve_output_dirs(values["job_dir"], environ,
                               job_dir_given=flag_values["job_dir"].present)
    config = Config(demo=demo, **{**values, **dirs})
    validate(config, check_paths=check_paths)
    return config


def _numbers(name: str, texts, example: str) -> Tuple[float, ...]:
    try:
        return tuple(float(text) for text in texts)
    except ValueError:
        raise ConfigError(f"--{name}={','.join(texts)!r} must be comma-separated "
                          f"numbers, e.g. {example}.") from None


def _default_fine_tune_at(backbone: str) -> int:
    from trainer import model  # The registry holds each backbone's default.

    # An unknown backbone gets 0 here; validate() names --backbone as the error.
    spec = model.BACKBONES.get(backbone)
    return spec.fine_tune_at if spec else 0


def _flag_names():
    return [f.name for f in dataclasses.fields(Config)
            if f.name not in ("model_dir", "checkpoint_dir", "log_dir", "demo",
                              "recipe_pinned")]


def resolve_output_dirs(job_dir: str, environ: Mapping[str, str],
                        job_dir_given: bool = True) -> dict:
    """Output folders, following Vertex AI's AIP_* variables when set.

    On Vertex AI with ``baseOutputDirectory`` and no --job_dir, the job dir
    (config.json, metrics.json) is the parent of AIP_MODEL_DIR, so every
    output lands under the base output directory. Vertex AI's values end in
    "/"; it is dropped so that joined paths have no empty "//" segment.
    """
    aip = {name: environ.get(name, "").rstrip("/") for name in
           ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR")}
    job_dir = job_dir.rstrip("/")
    if not job_dir_given and aip["AIP_MODEL_DIR"]:
        job_dir = aip["AIP_MODEL_DIR"].rsplit("/", 1)[0]
    return dict(
        job_dir=job_dir,
        model_dir=aip["AIP_MODEL_DIR"] or f"{job_dir}/model",
        checkpoint_dir=aip["AIP_CHECKPOINT_DIR"] or f"{job_dir}/checkpoints",
        log_dir=aip["AIP_TENSORBOARD_LOG_DIR"] or f"{job_dir}/logs",
    )


def validate(config: Config, check_paths: bool = True) -> None:
    """Raises ConfigError naming the first flag whose value cannot work.

    Only cheap checks live here: values, ranges and path existence. Nothing is
    built and no data is read beyond listing a folder; ``check_paths=False``
    skips the path checks too (offline validation of Vertex AI specs).
    """
    from trainer import model  # The registry, for backbone names.
    from trainer import schedules

    checks = [
        ("image_size", config.image_size >= 32, "must be at least 32 pixels"),
        ("batch_size", config.batch_size >= 1, "must be at least 1"),
        ("epochs", config.epochs >= 0, "must be 0 or more"),
        ("fine_tune_epochs", config.fine_tune_epochs >= 0, "must be 0 or more"),
        ("epochs", config.epochs + config.fine_tune_epochs > 0,
         "and --fine_tune_epochs are both 0: nothing to train"),
        ("fine_tune_at", config.fine_tune_at >= 0, "must be 0 or more"),
        ("learning_rate", config.learning_rate > 0, "must be positive"),
        ("fine_tune_learning_rate", config.fine_tune_learning_rate > 0, "must be positive"),
        ("dropout", 0.0 <= config.dropout < 1.0, "must be in [0, 1)"),
        ("backbone", config.backbone in model.BACKBONES,
         f"must be one of {sorted(model.BACKBONES)}"),
        ("test_fraction", 0.0 <= config.test_fraction < 1.0, "must be in [0, 1)"),
        ("checkpoint_every_steps", config.checkpoint_every_steps >= 0, "must be 0 or more"),
        ("shuffle_buffer", config.shuffle_buffer >= 1, "must be at least 1"),
        ("lr_schedule", config.lr_schedule in schedules.SCHEDULES,
         f"must be one of {list(schedules.SCHEDULES)}"),
        ("warmup_epochs", config.warmup_epochs >= 0, "must be 0 or more"),
        ("label_smoothing", 0.0 <= config.label_smoothing < 1.0, "must be in [0, 1)"),
        ("early_stopping_patience", config.early_stopping_patience >= 0,
         "must be 0 or more (0: off)"),
        ("fine_tune_cache_max_gb", config.fine_tune_cache_max_gb >= 0, "must be 0 or more"),
        ("cache_spill_dir", "://" not in config.cache_spill_dir,
         "must be a local folder (a gs:// store goes in --cache_dir)"),
        ("max_restarts", config.max_restarts >= 0, "must be 0 or more"),
        ("restart_wait_seconds", config.restart_wait_seconds >= 0, "must be 0 or more"),
        ("watchdog_floor_seconds", config.watchdog_floor_seconds > 0, "must be positive"),
        ("job_dir", bool(config.job_dir), "must not be empty"),
        ("recipe", config.recipe in recipe_lib.RECIPES,
         f"must be one of {list(recipe_lib.RECIPES)}"),
        ("head_learning_rates", bool(config.head_learning_rates)
         and all(rate > 0 for rate in config.head_learning_rates),
         "must be one or more positive numbers"),
        ("split_fractions", len(config.split_fractions) == 3
         and all(f >= 0 for f in config.split_fractions)
         and config.split_fractions[0] > 0 and config.split_fractions[1] > 0
         and abs(sum(config.split_fractions) - 1.0) < 1e-6,
         "must be train,validation,test fractions, train and validation above 0, "
         "summing to 1"),
        ("class_weighting", config.class_weighting in ("none", "balanced"),
         "must be 'none' or 'balanced'"),
        ("max_image_pixels", config.max_image_pixels >= 1, "must be at least 1"),
        ("task", config.task in ("auto", "single_label", "multi_label"),
         "must be 'auto', 'single_label' or 'multi_label'"),
        ("multi_label_threshold", config.multi_label_threshold is None
         or 0.0 < config.multi_label_threshold < 1.0, "must be in (0, 1), or unset"),
        ("tpu", not (config.tpu and config.strategy not in ("auto", "tpu")),
         f"is set but --strategy={config.strategy}; use --strategy=tpu or auto"),
    ]
    for name, ok, message in checks:
        if not ok:
            value = getattr(config, name)
            raise ConfigError(f"--{name}={value!r} {message}.")
    if config.export_onnx:
        _validate_onnx_installed()
    if not check_paths:
        return
    if not (config.demo and config.weights == DEMO_SOURCE_WEIGHTS):
        _validate_weights(config.weights)
    if not config.demo:
        _validate_data_dir(config.data_dir)
    if config.cache_dir:
        _validate_cache_dir(config.cache_dir)


def _validate_onnx_installed() -> None:
    from trainer import onnx_export

    try:
        onnx_export.check_installed()
    except ImportError as e:
        raise ConfigError(f"--export_onnx: {e}") from None


def _validate_weights(weights: str) -> None:
    if weights in ("imagenet", "none"):
        return
    if not _exists("--weights", weights):
        raise ConfigError(
            f"--weights={weights!r}: no such file; use 'imagenet', 'none' or "
            "the path of a Keras weights file.")


def _validate_cache_dir(cache_dir: str) -> None:
    """That --cache_dir can be created (before any frozen work is computed for it)."""
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(cache_dir)
    except tf.errors.OpError as e:
        raise ConfigError(f"--cache_dir={cache_dir!r} cannot be created ({e.message}); "
                          "give a writable local or gs:// folder, or leave it empty.") from None


def _validate_data_dir(data_dir: str) -> None:
    """That --data_dir names something with a layout (one listing of its top folder)."""
    import tensorflow as tf

    from trainer.data import sources

    _check_gcs("--data_dir", data_dir)
    try:
        sources.detect_layout(data_dir)
    except (sources.DataError, tf.errors.OpError) as e:
        raise ConfigError(f"--data_dir={data_dir!r}: {e} Expected train/ and validation/ "
                          "of class-named subfolders, class folders alone, Vertex AI "
                          "import files (.csv, .jsonl) or a manifest.json from "
                          "trainer.prepare.") from None


def _exists(label: str, path: str) -> bool:
    import tensorflow as tf

    _check_gcs(label, path)
    try:
        return tf.io.gfile.exists(path)
    except tf.errors.OpError:
        return False


def _check_gcs(label: str, path: str) -> None:
    """For gs:// paths: raises a missing bucket or refused access with the way out.

    First, so that TensorFlow's own terse error (or, without credentials, its
    retries of every request) is met once, here.
    """
    from trainer import preflight

    for part in path.split(","):
        preflight.check_gcs_paths({label: part})


def write_config(config: Config, directory: str) -> str:
    """Writes the resolved config as JSON beside the results; returns its path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    path = f"{directory.rstrip('/')}/config.json"
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(config.to_json())
    return path
