"""Flags, their validation, presets and the resolved ``Config`` of a run.

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

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
MIXED_PRECISION_POLICIES = ("none", "mixed_float16", "mixed_bfloat16")
CACHE_MEMORY = "memory"
CACHE_NONE = "none"
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
    feature_cache: bool = True
    fine_tune_cache: bool = True
    fine_tune_cache_max_gb: float = 4.0
    mixed_precision: str = "none"
    jit_compile: bool = False
    max_restarts: int = 3
    restart_wait_seconds: float = 600.0
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the trainer's flags on ``flag_values``.

    A function rather than module-level definitions so that other tools (the
    Vertex AI spec validator) can parse trainer arguments into a fresh
    ``FlagValues`` with exactly the trainer's definitions.
    """
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum(
        "recipe", recipe_lib.AUTO, recipe_lib.RECIPES,
        "'auto': step budgets scaled to the data, early stopping on validation "
        "loss with the best weights kept, the head's learning rate searched on "
        "cached features and phase 2's rate set from it; any of --epochs, "
        "--fine_tune_epochs, --learning_rate, --fine_tune_learning_rate, "
        "--early_stopping_patience given explicitly is kept. 'tutorial': exactly "
        "the epochs and rates of those flags, whose defaults are the tutorial's.", **fv)
    flags.DEFINE_list(
        "head_learning_rates", [f"{r:g}" for r in recipe_lib.HEAD_LEARNING_RATES],
        "--recipe=auto: learning rates the phase-1 search tries, comma-separated.", **fv)
    flags.DEFINE_string(
        "data_dir", "",
        "Input data, local or gs://: a folder with train/ and validation/ "
        "(optionally test/; aliases training/, val/, valid/, testing/) of "
        "class-named image subfolders; a folder of class folders only (split by "
        "--split_fractions); Vertex AI import files (.csv or .jsonl, "
        "comma-separated for several); or the output of trainer.prepare "
        "(manifest.json + TFRecords). Empty: generate and train on the embedded "
        "demo dataset.", **fv)
    flags.DEFINE_string(
        "job_dir", "job",
        "Root for outputs, local or gs://: model/, checkpoints/, logs/. "
        "Vertex AI's AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and "
        "AIP_TENSORBOARD_LOG_DIR take precedence when set. Re-running with the "
        "same job_dir resumes.", **fv)
    flags.DEFINE_integer("image_size", 160, "Side of the square model input, in pixels.", **fv)
    flags.DEFINE_integer(
        "batch_size", 32,
        "Images per replica per step; the global batch is this times the "
        "number of replicas in sync.", **fv)
    flags.DEFINE_integer("epochs", 10, "Epochs of phase 1 (frozen backbone, head only).", **fv)
    flags.DEFINE_integer(
        "fine_tune_epochs", 10,
        "Epochs of phase 2 (backbone layers from --fine_tune_at on train too); "
        "0 skips phase 2.", **fv)
    flags.DEFINE_integer(
        "fine_tune_at", 100,
        "Index of the first backbone layer unfrozen in phase 2. When not "
        "given, the --backbone's own default from the registry in "
        "trainer/model.py (this 100 is mobilenet_v2's, the recipe's value).", **fv)
    flags.DEFINE_float("learning_rate", 1e-4, "Learning rate of phase 1 (--optimizer).", **fv)
    flags.DEFINE_float(
        "fine_tune_learning_rate", 1e-5,
        "Learning rate of phase 2 (--fine_tune_optimizer).", **fv)
    flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "Optimizer of phase 1.", **fv)
    flags.DEFINE_enum("fine_tune_optimizer", "rmsprop", OPTIMIZERS, "Optimizer of phase 2.", **fv)
    flags.DEFINE_float(
        "dropout", 0.2, "Dropout rate before the logit layer, in [0, 1).", **fv)
    flags.DEFINE_string(
        "backbone", "mobilenet_v2",
        "Backbone name from the registry in trainer/model.py.", **fv)
    flags.DEFINE_string(
        "weights", "imagenet",
        "Backbone initialisation: 'imagenet', 'none' (random), or a path to a "
        "Keras weights file (.h5 or .weights.h5, local or gs://).", **fv)
    flags.DEFINE_bool(
        "augment", True,
        "Random horizontal flip and rotation (0.2 of a turn) during training.", **fv)
    flags.DEFINE_enum(
        "strategy", "auto", STRATEGIES,
        "tf.distribute strategy. 'auto': tpu when --tpu is set, multi_worker "
        "when TF_CONFIG names several tasks, mirrored with several GPUs, else "
        "one_device.", **fv)
    flags.DEFINE_string(
        "tpu", "",
        "TPU name or address for TPUClusterResolver ('local' on a TPU VM). "
        "Implies --strategy=tpu under 'auto'.", **fv)
    flags.DEFINE_integer("seed", 42, "Seed for data order, splits and initialisation.", **fv)
    flags.DEFINE_integer(
        "checkpoint_every_steps", 0,
        "Back up the training state every this many steps (and at every epoch "
        "end); 0 backs up at epoch ends only.", **fv)
    flags.DEFINE_float(
        "test_fraction", 0.2,
        "Without a test/ split, this fraction of validation images (chosen "
        "deterministically by --seed) is held out as the test split.", **fv)
    flags.DEFINE_string(
        "cache", CACHE_MEMORY,
        "Cache decoded, resized images: 'memory', 'none', or a file path "
        "prefix for an on-disk cache.", **fv)
    flags.DEFINE_integer(
        "shuffle_buffer", 10000, "Shuffle buffer of the training set, in images.", **fv)
    flags.DEFINE_string(
        "hypertune_metric", "",
        "Epoch metric (e.g. val_accuracy) reported after every epoch to a Vertex "
        "AI hyperparameter tuning job through cloudml-hypertune; must equal the "
        "study's metricId. Empty, or outside a tuning trial: nothing is reported.", **fv)
    flags.DEFINE_string(
        "lr_schedule", "constant",
        "Learning rate within each phase: 'constant' (the recipe) or 'cosine' "
        "(decays to 0 by the phase's last step). Either starts with "
        "--warmup_epochs of linear warmup.", **fv)
    flags.DEFINE_float(
        "warmup_epochs", 0.0,
        "Linear learning-rate warmup at the start of each phase, in epochs "
        "(fractions allowed; turned into steps with the steps per epoch).", **fv)
    flags.DEFINE_float(
        "label_smoothing", 0.0,
        "Label smoothing of the cross-entropy loss, in [0, 1): targets move "
        "this fraction of the way towards uniform (binary and multi-class).", **fv)
    flags.DEFINE_integer(
        "early_stopping_patience", 0,
        "Stop a phase after this many epochs without a lower validation loss "
        "and restore the phase's best weights; 0 turns early stopping off.", **fv)
    flags.DEFINE_bool(
        "feature_cache", True,
        "Phase 1 computes the frozen backbone's pooled features once per image "
        "and trains the head on them (no augmentation in phase 1); false runs "
        "the backbone every phase-1 step as the tutorial does.", **fv)
    flags.DEFINE_bool(
        "fine_tune_cache", True,
        "Phase 2 computes, once per image, the activations that the unfrozen "
        "layers read from the frozen ones below --fine_tune_at, and trains on "
        "them (with --augment, of the image or its mirror image: random flips, "
        "no rotation); false runs the whole backbone every phase-2 step on "
        "augmented images.", **fv)
    flags.DEFINE_float(
        "fine_tune_cache_max_gb", 4.0,
        "Largest --fine_tune_cache per worker, in GB of memory; a larger one "
        "falls back to images (logged).", **fv)
    flags.DEFINE_enum(
        "mixed_precision", "none", MIXED_PRECISION_POLICIES,
        "Keras mixed-precision policy: mixed_float16 for GPUs, mixed_bfloat16 "
        "for TPUs; the logit layer stays float32.", **fv)
    flags.DEFINE_bool(
        "jit_compile", False,
        "Compile train steps with XLA. Faster on GPU and TPU; about ten times "
        "slower on CPU, so off by default.", **fv)
    flags.DEFINE_integer(
        "max_restarts", 3,
        "Times a worker restarts itself in place after a transient failure "
        "(UnavailableError, DeadlineExceededError, AbortedError: a peer died "
        "or was preempted, a storage hiccup), resuming from its last backup; "
        "counted over the process's life. 0 fails at once.", **fv)
    flags.DEFINE_float(
        "restart_wait_seconds", 600.0,
        "Before such a restart, seconds to wait for every other worker of a "
        "multi-worker job to accept connections again (the platform restarts "
        "a lost one); past it the worker exits non-zero.", **fv)
    flags.DEFINE_bool(
        "export_tflite", False,
        "After export, also convert the model to TFLite (float and "
        "dynamic-range quantized) under <job_dir>/tflite. Off by default: "
        "only jobs that ask for it risk failing at the end on a converter "
        "error, and `python -m trainer.tflite` converts any exported model "
        "later.", **fv)
    _define_data_flags(fv)


def _define_data_flags(fv: dict) -> None:
    """Flags of how data is listed and weighed (trainer/data/sources.py, weighting.py)."""
    flags.DEFINE_list(
        "split_fractions", ["0.8", "0.1", "0.1"],
        "train,validation,test fractions of each class for images without an "
        "assigned split (a folder of class folders only; import-file rows "
        "without ML_USE or with 'unassigned'), chosen by --seed; AutoML's "
        "default 80/10/10.", **fv)
    flags.DEFINE_bool(
        "strict", False,
        "Fail on the first bad import-file row (missing file, empty label, "
        "unknown ML_USE, conflicting duplicate, label without training image) "
        "instead of skipping bad rows with a report.", **fv)
    flags.DEFINE_bool(
        "flatten_nested", False,
        "Take files in subfolders of a class folder as images of that class; "
        "without it such a subfolder is an error naming it.", **fv)
    flags.DEFINE_enum(
        "class_weighting", "none", ("none", "balanced"),
        "Per-example loss weights: 'none' (the recipe) or 'balanced' "
        "(n / (k * n_class) from the train split's counts), in both phases.", **fv)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS,
                      environ: Optional[Mapping[str, str]] = None,
                      check_paths: bool = True) -> Config:
    """Builds and validates the Config of a run from parsed flags.

    ``check_paths=False`` skips the checks that touch --data_dir and
    --weights (the offline spec validator cannot reach gs://).
    """
    environ = os.environ if environ is None else environ
    values = {name: flag_values[name].value for name in _flag_names()}
    values["split_fractions"] = _fractions(values["split_fractions"])
    demo = not values["data_dir"]
    preset = set()
    if demo:
        for name, value in DEMO_PRESET.items():
            if not flag_values[name].present:
                values[name] = value
                preset.add(name)
    values["head_learning_rates"] = _floats("head_learning_rates", values["head_learning_rates"])
    values["recipe_pinned"] = tuple(knob for knob in recipe_lib.KNOBS
                                    if flag_values[knob].present or knob in preset)
    if not flag_values["fine_tune_at"].present:
        values["fine_tune_at"] = _default_fine_tune_at(values["backbone"])
    dirs = resolve_output_dirs(values["job_dir"], environ,
                               job_dir_given=flag_values["job_dir"].present)
    config = Config(demo=demo, **{**values, **dirs})
    validate(config, check_paths=check_paths)
    return config


def _floats(name: str, texts) -> Tuple[float, ...]:
    try:
        return tuple(float(text) for text in texts)
    except ValueError:
        raise ConfigError(f"--{name}={','.join(texts)!r} must be comma-separated numbers.")


def _fractions(values) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ConfigError(f"--split_fractions={','.join(values)!r} must be three numbers, "
                          "e.g. 0.8,0.1,0.1.") from None


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
        ("max_restarts", config.max_restarts >= 0, "must be 0 or more"),
        ("restart_wait_seconds", config.restart_wait_seconds >= 0, "must be 0 or more"),
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
        ("tpu", not (config.tpu and config.strategy not in ("auto", "tpu")),
         f"is set but --strategy={config.strategy}; use --strategy=tpu or auto"),
    ]
    for name, ok, message in checks:
        if not ok:
            value = getattr(config, name)
            raise ConfigError(f"--{name}={value!r} {message}.")
    if not check_paths:
        return
    if not (config.demo and config.weights == DEMO_SOURCE_WEIGHTS):
        _validate_weights(config.weights)
    if not config.demo:
        _validate_data_dir(config.data_dir)


def _validate_weights(weights: str) -> None:
    import tensorflow as tf

    if weights in ("imagenet", "none"):
        return
    if not tf.io.gfile.exists(weights):
        raise ConfigError(
            f"--weights={weights!r}: no such file; use 'imagenet', 'none' or "
            "the path of a Keras weights file.")


def _validate_data_dir(data_dir: str) -> None:
    """That --data_dir names something with a layout (one listing of its top folder)."""
    from trainer.data import sources

    try:
        sources.detect_layout(data_dir)
    except sources.DataError as e:
        raise ConfigError(f"--data_dir={data_dir!r}: {e} Expected train/ and validation/ "
                          "of class-named subfolders, class folders alone, Vertex AI "
                          "import files (.csv, .jsonl) or a manifest.json from "
                          "trainer.prepare.") from None


def write_config(config: Config, directory: str) -> str:
    """Writes the resolved config as JSON beside the results; returns its path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    path = f"{directory.rstrip('/')}/config.json"
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(config.to_json())
    return path
