"""Entry point: ``python -m trainer.task --flag=...`` (the command Vertex AI runs).

Parses flags into a Config, builds the strategy and hands both to the
trainer (or to the demo when no --data_dir is given), under the fault
handling of ``recovery.py``. Nothing else.
"""

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import json

import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from trainer import cluster
from trainer import config as config_lib
from trainer import demo
from trainer import preflight
from trainer import recovery
from trainer import train
from trainer import watchdog
from trainer.data import pipeline

FLAGS = flags.FLAGS


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_lib.config_from_flags(FLAGS)
        preflight.check_run(config)  # Buckets, credentials, ImageNet weights: before any data.
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    info = cluster.cluster_info()
    name = cluster.choose_strategy(config.strategy, config.tpu, info,
                                   len(tf.config.list_physical_devices("GPU")))
    # After an in-place restart, peers that never come back must not hang the job.
    with recovery.exit_unless_done_within(
            config.restart_wait_seconds if info.restarts else None, "Rejoining the cluster"):
        strategy = cluster.create_strategy(name, config.tpu)
    logging.info("Strategy %s with %d replicas; task %s/%d.", name,
                 strategy.num_replicas_in_sync, info.task_type, info.task_id)
    run = demo.run_demo if config.demo else train.train_and_evaluate
    recovery.install_sigterm_handler()
    watchdog.install(config.watchdog_floor_seconds, config.watchdog_seconds, info.peers)
    try:
        metrics = recovery.run_with_restarts(
            lambda: run(config, strategy, info), config.max_restarts, info.restarts,
            info.peers, config.restart_wait_seconds)
    except (config_lib.ConfigError, pipeline.DataError) as e:
        # Found once the data is listed (a resume into another run, a missing or
        # corrupt shard): one clear message, no traceback.
        logging.error("%s", e)
        raise SystemExit(f"Error: {e}") from None
    if info.is_chief:
        _print_summary(config, metrics)


def _print_summary(config: config_lib.Config, metrics: dict) -> None:
    splits = [split for split in ("validation", "test") if split in metrics]
    print()
    for key, name in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                      ("macro_f1", "Macro F1"), ("micro_f1", "Micro F1"),
                      ("mean_average_precision", "Mean average precision")):
        values = {split: round(metrics[split][key], 4) for split in splits
                  if key in metrics[split]}
        if values:
            print(f"{name}: {json.dumps(values)}")
    # The newest complete version: the folder to serve or upload (trainer/export.py).
    print(f"Model:       {metrics.get('model', config.model_dir)}")
    print(f"Checkpoints: {config.checkpoint_dir}")
    print(f"Metrics:     {config.job_dir}/metrics.json")
    print(f"TensorBoard: tensorboard --logdir {config.log_dir}")


def main():
    config_lib.define_flags()
    app.run(_main)


if __name__ == "__main__":
    main()
