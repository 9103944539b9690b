"""Command line: image folders or Vertex AI import files -> sharded TFRecords, a report
and a manifest.

    python -m trainer.prepare --input_dir=gs://bucket/images --output_dir=gs://bucket/prepared
    trainer-prepare --input_dir=... --output_dir=...   # the same, as a console script

Then train with ``--data_dir=<output_dir>``. The work is done by
:mod:`trainer.data.prepare`; docs/data.md describes the input layouts, the
record schema and the report. Exits 0 when the manifest was written or was
already up to date, 1 when nothing usable is left or a class has no usable
image in train or validation (the report says which), and 2 on bad flags.
"""

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from absl import app
from absl import flags
from absl import logging

from trainer import preflight
from trainer.data import prepare as prepare_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags of this command on ``flag_values``."""
    fv = dict(flag_values=flag_values)
    defaults = prepare_lib.Options()
    flags.DEFINE_string(
        "input_dir", None,
        "Images, local or gs://: train/ and validation/ (optionally test/; "
        "aliases training/, val/, valid/, testing/) of class-named subfolders; "
        "class-named subfolders alone (split by --split_fractions); or Vertex "
        "AI import files (.csv or .jsonl, comma-separated for several).", **fv)
    flags.DEFINE_string(
        "output_dir", None,
        "Where the shards, prepare_report.json and manifest.json go, local or "
        "gs://; not inside --input_dir.", **fv)
    flags.DEFINE_integer(
        "min_shards", defaults.min_shards,
        "Fewest shards per split (fewer only when a split has fewer images), so "
        "that every worker of a multi-worker job reads its own files.", **fv)
    flags.DEFINE_float(
        "shard_mb", defaults.shard_bytes / 2**20,
        "Target shard size in MiB (2**20 bytes), estimated from a sample of "
        "file sizes.", **fv)
    flags.DEFINE_integer(
        "workers", defaults.workers,
        "Threads writing shards in parallel; 0: one per CPU.", **fv)
    flags.DEFINE_integer(
        "max_side", defaults.max_side,
        "Downscale images whose longer side exceeds this many pixels (aspect "
        "ratio kept); 0 keeps every size.", **fv)
    flags.DEFINE_integer(
        "max_image_pixels", defaults.max_image_pixels,
        "Largest image accepted, in decoded pixels (width x height, read from the "
        "header before decoding); a larger one (a decompression bomb) is skipped and "
        "reported. The default is Pillow's MAX_IMAGE_PIXELS.", **fv)
    flags.DEFINE_integer(
        "jpeg_quality", defaults.jpeg_quality,
        "JPEG quality (1-100) of converted or downscaled images; JPEGs already "
        "in RGB are stored unchanged.", **fv)
    flags.DEFINE_list(
        "split_fractions", [str(f) for f in defaults.split_fractions],
        "train,validation,test fractions of each class for images without an "
        "assigned split (class folders alone; import rows without ML_USE or "
        "'unassigned'), chosen by --seed, as the trainer splits them.", **fv)
    flags.DEFINE_float(
        "test_fraction", defaults.test_fraction,
        "Input without any test image: share of each validation class (by "
        "--seed) held out as the test split, as the trainer does; 0 keeps no "
        "test split.", **fv)
    flags.DEFINE_bool(
        "strict", defaults.strict,
        "Fail on the first bad import-file row instead of skipping bad rows "
        "with a report.", **fv)
    flags.DEFINE_bool(
        "flatten_nested", defaults.flatten_nested,
        "Take files in subfolders of a class folder as images of that class; "
        "without it such a subfolder is an error naming it.", **fv)
    flags.DEFINE_integer(
        "seed", defaults.seed, "Seed of the split assignment and of the order within shards.",
        **fv)
    flags.DEFINE_bool(
        "overwrite", defaults.overwrite,
        "Rewrite even when the manifest says the output is up to date (for "
        "images changed in place under the same names).", **fv)
    flags.DEFINE_bool("progress", defaults.progress, "Show a progress bar (or log lines).", **fv)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> prepare_lib.Options:
    """The Options the parsed flags ask for."""
    return prepare_lib.Options(
        min_shards=flag_values.min_shards,
        shard_bytes=max(1, int(flag_values.shard_mb * 2**20)),
        workers=flag_values.workers,
        max_side=flag_values.max_side,
        max_image_pixels=flag_values.max_image_pixels,
        jpeg_quality=flag_values.jpeg_quality,
        split_fractions=tuple(float(f) for f in flag_values.split_fractions),
        test_fraction=flag_values.test_fraction,
        seed=flag_values.seed,
        strict=flag_values.strict,
        flatten_nested=flag_values.flatten_nested,
        overwrite=flag_values.overwrite,
        progress=flag_values.progress,
    )


def run(flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Prepares what the parsed flags say; returns the exit status (0 or 1).

    Raises:
      app.UsageError: a flag is missing or its value cannot work.
    """
    for name in ("input_dir", "output_dir"):
        if not flag_values[name].value:
            raise app.UsageError(f"--{name} is required.", exitcode=2)
    try:
        # A missing bucket or refused access: named before any file is listed.
        preflight.check_gcs_paths({"--input_dir": flag_values.input_dir,
                                   "--output_dir": flag_values.output_dir})
        result = prepare_lib.prepare(flag_values.input_dir, flag_values.output_dir,
                                     options_from_flags(flag_values))
    except (prepare_lib.PrepareError, preflight.PreflightError) as e:
        raise app.UsageError(str(e), exitcode=2) from None
    if not result.ok:
        logging.error("No manifest written: %s", " ".join(result.errors))
        return 1
    return 0


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    return run(FLAGS)


def main():
    define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
