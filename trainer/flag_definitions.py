"""The trainer's command-line flags: their names, defaults and help texts.

``define_flags`` is a function rather than module-level definitions so that
other tools (the Vertex AI spec validator, ``deploy.submit``) can parse trainer
arguments into a fresh ``FlagValues`` with exactly the trainer's definitions.
``trainer/config.py`` turns the parsed values into a validated ``Config``.
"""

from absl import flags

from trainer import recipe as recipe_lib

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
MIXED_PRECISION_POLICIES = ("none", "mixed_float16", "mixed_bfloat16")
CACHE_MEMORY = "memory"
CACHE_NONE = "none"


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
        "Epoch metric (e.g. val_accuracy; multi-label: val_micro_f1 or "
        "val_mean_average_precision) reported after every epoch to a Vertex "
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
    _define_cache_flags(fv)
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
        "After export, also convert the model to TFLite (float32, float16, "
        "dynamic-range and int8 calibrated on the train split) under "
        "<job_dir>/tflite, and measure each on the test split (metrics.json "
        "'exports'). Off by default: only jobs that ask for it risk failing at "
        "the end on a converter error, and `python -m trainer.tflite` converts "
        "any exported model later.", **fv)
    flags.DEFINE_bool(
        "export_onnx", False,
        "After export, also convert the model to ONNX (tf2onnx) as "
        "<job_dir>/onnx/model.onnx and measure it with onnxruntime on the test "
        "split (metrics.json 'exports'). Needs the 'onnx' extra.", **fv)
    _define_data_flags(fv)
    _define_safety_flags(fv)
    _define_watchdog_flags(fv)


def _define_safety_flags(fv: dict) -> None:
    """Flags of hostile input and job-dir safety (trainer/data/images.py, resume_guard.py)."""
    flags.DEFINE_integer(
        "max_image_pixels", 89_478_485,
        "Largest image accepted, in decoded pixels (width x height, read from the "
        "file's header before decoding); a larger one (e.g. a decompression bomb) is "
        "skipped and reported by path. The default is Pillow's MAX_IMAGE_PIXELS.", **fv)
    flags.DEFINE_bool(
        "discard_backups", False,
        "When the job dir holds backups of a different run (another backbone, weights, "
        "image size, schedule, classes or data; see trainer/resume_guard.py), delete "
        "them and their finished-phase records and start afresh instead of refusing. "
        "Backups of this same run are still resumed.", **fv)


def _define_watchdog_flags(fv: dict) -> None:
    """Flags of the stuck-peer watchdog (trainer/watchdog.py)."""
    flags.DEFINE_float(
        "watchdog_seconds", 0.0,
        "Seconds a training or validation step may take before the worker takes "
        "the job for stuck (a frozen or hung peer), logs the suspect peers and "
        "exits with 75, for the job to restart from its last backup. The first "
        "step of a fit, an epoch's turn to validation and back, and a backup "
        "may take 10 times as long. 0: adaptive, the larger of "
        "--watchdog_floor_seconds and 10 x the slowest step so far. Negative: "
        "no watchdog.", **fv)
    flags.DEFINE_float(
        "watchdog_floor_seconds", 300.0,
        "With --watchdog_seconds=0: the least seconds a step may take before "
        "the watchdog ends the worker (slow windows: 10 times this).", **fv)


def _define_cache_flags(fv: dict) -> None:
    """Flags of where the frozen work lives (trainer/frozen_work.py, cache_store.py)."""
    flags.DEFINE_float(
        "fine_tune_cache_max_gb", 4.0,
        "Memory per worker for each phase's cache of frozen work, in GB; a larger "
        "cache is written to files as it is computed (--cache_dir, else "
        "--cache_spill_dir) and streamed from them every epoch (logged).", **fv)
    flags.DEFINE_string(
        "cache_dir", "",
        "Folder (local or gs://) of content-addressed caches of the frozen work "
        "(pooled features, phase-2 activations) that outlasts the job: a job with "
        "the same backbone, weights, image size, --fine_tune_at (phase 2 only), "
        "images and TensorFlow version reads them instead of computing them; "
        "tuning trials and reruns share it. Empty: nothing is kept.", **fv)
    flags.DEFINE_string(
        "cache_spill_dir", "",
        "Local folder under which a cache past --fine_tune_cache_max_gb is "
        "spilled when there is no --cache_dir (removed when the job ends). "
        "Empty: the system's temporary folder.", **fv)


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
        "(n / (k * n_class) from the train split's counts), in both phases; "
        "multi-label: each class's positive term weighted n_negative / n_positive.", **fv)
    flags.DEFINE_enum(
        "task", "auto", ("auto", "single_label", "multi_label"),
        "'single_label' (one class per image, softmax), 'multi_label' (any number "
        "of classes per image: a sigmoid per class, thresholds chosen on validation) "
        "or 'auto': multi_label when some training image of an import file has "
        "several labels.", **fv)
    flags.DEFINE_float(
        "multi_label_threshold", None,
        "Multi-label: one decision threshold (probability in (0, 1)) for every class. "
        "Unset: each class's threshold of best F1 on the validation split.", **fv)
