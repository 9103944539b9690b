"""The recipe: tutorial preset flag for flag, auto's budgets, the head search and its resume."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from absl import flags

from conftest import tiny_config
from trainer import callbacks as callbacks_lib
from trainer import cluster
from trainer import config as config_lib
from trainer import recipe
from trainer import train


def _parse(args, data_dir):
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["trainer", f"--data_dir={data_dir}", *args])
    return config_lib.config_from_flags(fv, environ={})


def test_tutorial_preset_is_the_tutorials_recipe_flag_for_flag(binary_dir):
    config = _parse(["--recipe=tutorial"], binary_dir)
    assert (config.epochs, config.fine_tune_epochs, config.optimizer, config.fine_tune_optimizer,
            config.learning_rate, config.fine_tune_learning_rate, config.fine_tune_at,
            config.image_size, config.batch_size, config.dropout,
            config.early_stopping_patience) == (10, 10, "adam", "rmsprop", 1e-4, 1e-5, 100,
                                                160, 32, 0.2, 0)
    # 2,000 images at batch 32: the tutorial's 63 steps an epoch, no early stopping.
    assert [(p.number, p.first_epoch, p.last_epoch, p.optimizer, p.learning_rate,
             p.steps_per_epoch, p.patience, p.restore_best, p.learning_rates)
            for p in train.phases(config, steps_per_epoch=63)] == [
        (1, 0, 10, "adam", 1e-4, 63, 0, False, ()),
        (2, 10, 20, "rmsprop", 1e-5, 63, 0, False, ())]


def test_auto_is_the_default_and_keeps_what_the_user_sets(binary_dir):
    config = _parse([], binary_dir)
    assert config.recipe == "auto" and config.recipe_pinned == ()
    pinned = _parse(["--learning_rate=0.01", "--fine_tune_epochs=3"], binary_dir)
    assert pinned.recipe_pinned == ("fine_tune_epochs", "learning_rate")
    one = recipe.phase_one(pinned, steps_per_epoch=63, can_search=True)
    assert (one.learning_rate, one.learning_rates) == (0.01, ())  # No search: the rate is set.
    two = recipe.phase_two(pinned, 63, first_epoch=one.last_epoch, head_learning_rate=0.01)
    assert (two.steps_per_epoch, two.last_epoch - two.first_epoch) == (63, 3)
    assert two.learning_rate == pytest.approx(1e-4)  # FINE_TUNE_RATIO x the head's rate.


@pytest.mark.parametrize("train_images, head, fine_tune", [
    # (images, (steps, steps between validations), the same for phase 2), batch 32.
    (40, (1500, 50), (300, 10)),        # 20 a class: floors, not 10 epochs of 2 steps.
    (120, (1500, 50), (300, 10)),
    (2000, (1512, 63), (630, 63)),      # The tutorial's set: epochs as validation intervals.
    (100000, (10000, 1000), (30000, 3000)),  # Capped; at least 10 validations.
])
def test_auto_budgets_are_in_steps_scaled_to_the_data(binary_dir, train_images, head,
                                                      fine_tune):
    config = _parse([], binary_dir)
    steps_per_epoch = -(-train_images // 32)
    one = recipe.phase_one(config, steps_per_epoch, can_search=True)
    two = recipe.phase_two(config, steps_per_epoch, one.last_epoch, one.learning_rate)
    assert abs(one.steps - head[0]) <= one.steps_per_epoch and one.steps_per_epoch == head[1]
    assert abs(two.steps - fine_tune[0]) <= two.steps_per_epoch
    assert two.steps_per_epoch == fine_tune[1]
    assert one.learning_rates == recipe.HEAD_LEARNING_RATES and one.restore_best
    assert two.first_epoch == one.last_epoch and two.patience == recipe.PATIENCE


def test_auto_without_the_feature_cache_trains_one_fixed_rate(binary_dir):
    config = _parse(["--feature_cache=false"], binary_dir)
    one = recipe.phase_one(config, 63, can_search=False)
    assert (one.learning_rate, one.learning_rates) == (recipe.FIXED_HEAD_LEARNING_RATE, ())


def test_head_learning_rates_flag_is_checked(binary_dir):
    with pytest.raises(config_lib.ConfigError, match="head_learning_rates"):
        _parse(["--head_learning_rates=1e-3,fast"], binary_dir)
    with pytest.raises(config_lib.ConfigError, match="head_learning_rates"):
        _parse(["--head_learning_rates=1e-3,-1"], binary_dir)


# ----------------------------------------------------------- The head search


def _blobs(seed, count=256):
    """Two overlapping Gaussian blobs in 16 dimensions, labels 0/1, 4 sigma apart: a
    linear head separates all but about 2% of them, so a head that overshoots to huge
    weights (a far too high rate) pays for the few it gets wrong with a large loss."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    features = rng.normal(size=(count, 16)).astype("float32") + 1.0 * labels[:, None]
    return features, labels.astype("float32")


def _runner(phase, tmp_path, strategy, data_dir):
    keras.utils.set_random_seed(0)  # The head's initial weights: the same every run.
    with strategy.scope():
        head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1)])
    train_x, train_y = _blobs(0)
    val_x, val_y = _blobs(1)
    train_data = tf.data.Dataset.from_tensor_slices((train_x, train_y)).shuffle(
        256, seed=0).repeat().batch(32)
    val_data = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(64).repeat()
    config = tiny_config(data_dir, tmp_path / "job", recipe="auto")
    return train._Runner(phase, (head, train_data, val_data), config, strategy,
                         cluster.ClusterInfo(), num_classes=2, global_batch=32,
                         validation_steps=4)


def _search_phase(rates):
    return recipe.Phase(1, 0, 8, "adam", rates[0], steps_per_epoch=25, patience=3,
                        restore_best=True, learning_rates=rates)


def test_search_picks_the_rate_that_clearly_wins(tmp_path, binary_dir):
    # 1e-6 barely moves from the start; 1e4 makes Adam's steps (about the rate per
    # weight) overshoot to logits so large that the few overlapping points cost a lot.
    runner = _runner(_search_phase((1e-6, 3e-2, 1e4)), tmp_path,
                     tf.distribute.get_strategy(), binary_dir)
    phase, history, chosen = runner.run()
    rows = {row["learning_rate"]: row for row in chosen["search"]}
    assert phase.learning_rate == 3e-2
    assert rows[3e-2]["val_loss"] < 0.5 * min(rows[1e-6]["val_loss"], rows[1e4]["val_loss"])
    # The head ends on the winner's best weights: its validation loss, recomputed.
    runner.model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    val_x, val_y = _blobs(1)
    assert runner.model.evaluate(val_x, val_y, verbose=0) == pytest.approx(
        rows[3e-2]["val_loss"], rel=1e-4)
    record = json.loads((tmp_path / "job" / "checkpoints" / "phase1" /
                         recipe.FINISHED_FILE).read_text())
    assert record["learning_rate"] == 3e-2 and len(record["search"]) == 3


def test_a_finished_search_is_not_redone(tmp_path, binary_dir, monkeypatch):
    strategy = tf.distribute.get_strategy()
    first = _runner(_search_phase((1e-6, 3e-2)), tmp_path, strategy, binary_dir)
    phase, _, chosen = first.run()
    weights = first.model.get_weights()

    def fail(self, *args, **kwargs):
        raise AssertionError("the finished search ran again")

    monkeypatch.setattr(train._Runner, "_search", fail)
    monkeypatch.setattr(train._Runner, "_fit", fail)
    again = _runner(_search_phase((1e-6, 3e-2)), tmp_path, strategy, binary_dir)
    phase_again, _, chosen_again = again.run()
    assert phase_again.learning_rate == phase.learning_rate == 3e-2
    assert chosen_again == chosen
    for restored, original in zip(again.model.get_weights(), weights):
        np.testing.assert_array_equal(restored, original)


def test_restore_best_ends_on_the_best_epoch_even_without_stopping():
    """A scripted curve: the loss falls, then a kick to the weights at epoch 4 makes it rise;
    the fit runs its whole budget (patience larger than the epochs) and still ends on the
    best epoch's weights."""
    x, y = _blobs(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), keras.losses.BinaryCrossentropy(from_logits=True))

    def kick(epoch, logs):
        if epoch == 3:
            kernel, bias = model.get_weights()
            model.set_weights([kernel - 5.0, bias])

    keep = callbacks_lib.RestoreBest(patience=100)
    snapshots = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=kick, on_epoch_end=lambda epoch, logs: snapshots.append(model.get_weights()))
    history = model.fit(x, y, validation_data=(x, y), epochs=6, batch_size=32, verbose=0,
                        callbacks=[keep, record])
    losses = history.history["val_loss"]
    best = int(np.argmin(losses))
    assert len(losses) == 6 and best == 2 and losses[-1] > 2 * losses[best]
    assert keep.best_epoch == best
    for restored, expected in zip(model.get_weights(), snapshots[best]):
        np.testing.assert_array_equal(restored, expected)


def test_auto_runs_end_to_end_and_resumes_without_searching_again(binary_dir, tmp_path,
                                                                  monkeypatch):
    config = tiny_config(binary_dir, tmp_path / "job", recipe="auto", backbone="demo_cnn",
                         fine_tune_at=5, epochs=3, fine_tune_epochs=2,
                         recipe_pinned=("epochs", "fine_tune_epochs"),
                         head_learning_rates=(1e-3, 1e-2))
    strategy = cluster.create_strategy("one_device")
    metrics = train.train_and_evaluate(config, strategy)
    search = metrics["recipe"]["search"]
    assert [row["learning_rate"] for row in search] == [1e-3, 1e-2]
    chosen = min(search, key=lambda row: row["val_loss"])["learning_rate"]
    one, two = metrics["recipe"]["phases"]
    # The chosen run's epochs, then phase 2's, in every history list alike.
    history = metrics["history"]
    assert {len(values) for values in history.values()} == {len(history["loss"])}
    assert history["phase"] == [1.0] * two["first_epoch"] + [2.0] * (
        len(history["loss"]) - two["first_epoch"])
    assert one["learning_rate"] == chosen
    assert two["learning_rate"] == pytest.approx(recipe.FINE_TUNE_RATIO * chosen)

    monkeypatch.setattr(train._Runner, "_search",
                        lambda self: pytest.fail("the finished search ran again"))
    again = train.train_and_evaluate(config, strategy)
    assert again["recipe"]["search"] == search
    assert again["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_auto_on_two_workers_chooses_alike_and_a_restart_keeps_the_search(binary_dir, tmp_path):
    """Two real MultiWorkerMirrored processes: both pick the same rate (the search decides
    on all-reduced validation losses); killed in phase 2 and restarted, neither searches
    again: both restore the chief's finished phase 1."""
    import signal

    from workers import Job

    job_dir = tmp_path / "job"
    args = [f"--data_dir={binary_dir}", f"--job_dir={job_dir}", "--weights=none",
            "--image_size=32", "--batch_size=2", "--backbone=demo_cnn", "--fine_tune_at=14",
            "--augment=false", "--epochs=2", "--fine_tune_epochs=2",
            "--head_learning_rates=1e-3,1e-2", "--restart_wait_seconds=60", "--v=1"]
    log = str(tmp_path / "workers.log")
    phase_two = r"Phase 2: rmsprop lr ([0-9.e-]+);"
    with Job(args, 2, log) as first:
        first.chief.wait_for(r"Phase 2: step 2 done", 300)
        first.signal(signal.SIGKILL)
        first.wait(60)
    rates = [w.wait_for(phase_two, 1)[1].group(1) for w in first.workers]
    assert rates[0] == rates[1]
    assert all(w.matches(r"Phase 1 search, on validation") for w in first.workers)

    with Job(args, 2, log) as second:
        assert second.wait(300) == [0, 0], second.chief.tail() + second.workers[1].tail()
    for worker in second.workers:
        assert worker.matches(r"Phase 1: finished before; restoring its final weights")
        assert not worker.matches(r"Phase 1 search, on validation")
        assert worker.wait_for(phase_two, 1)[1].group(1) == rates[0]
    metrics = json.loads((job_dir / "metrics.json").read_text())
    assert [row["learning_rate"] for row in metrics["recipe"]["search"]] == [1e-3, 1e-2]


def test_tuning_trials_report_the_restored_epoch_last(tmp_path, monkeypatch):
    """Under auto a phase ends on its best epoch's weights, so that epoch's value is the last
    measurement (hptune.yaml judges trials by their last one)."""
    import hypertune

    path = tmp_path / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
    best = callbacks_lib.RestoreBest()
    best.best_epoch = 11  # Of epochs 10-12 of phase 2, the second was best.
    reporter = callbacks_lib.HypertuneReporter("val_accuracy", enabled=True,
                                               client=hypertune.HyperTune(), best=best)
    for epoch, value in ((10, 0.90), (11, 0.95), (12, 0.93)):
        reporter.on_epoch_end(epoch, {"val_accuracy": value})
    reporter.on_train_end()
    reports = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["val_accuracy"], r["global_step"]) for r in reports] == [
        ("0.9", "11"), ("0.95", "12"), ("0.93", "13"), ("0.95", "14")]


# ------------------------------------------------------------------ Input side


def test_auto_trains_at_the_native_size_only_when_the_images_are_that_large(binary_dir):
    auto = _parse([], binary_dir)
    assert recipe.image_size(auto, 224, median_short_side=300) == 224
    assert recipe.image_size(auto, 224, median_short_side=223) == 160
    assert recipe.image_size(auto, None, median_short_side=300) == 160  # No native size.
    assert recipe.image_size(_parse(["--image_size=192"], binary_dir), 224, 300) == 192
    assert recipe.image_size(_parse(["--recipe=tutorial"], binary_dir), 224, 300) == 160


def _photos(root, sizes):
    from PIL import Image

    for i, (width, height) in enumerate(sizes):
        for split in ("train", "validation"):
            for name in ("a", "b"):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (width, height), (i * 20, 90, 200)).save(folder / f"{i}.png")
    return root


def test_median_short_side_reads_files_and_prepared_records(tmp_path):
    from trainer.data import image_sizes
    from trainer.data import pipeline
    from trainer.data import prepare

    data = _photos(tmp_path / "photos", [(300, 240), (500, 400), (260, 900)])
    split = pipeline.describe(str(data)).splits["train"]
    assert image_sizes.median_short_side(split) == 260  # Short sides 240, 400, 260 twice each.
    result = prepare.prepare(str(data), str(tmp_path / "records"),
                             prepare.Options(min_shards=1, progress=False))
    assert result.ok
    records_split = pipeline.describe(str(tmp_path / "records")).splits["train"]
    assert records_split.is_records and image_sizes.median_short_side(records_split) == 260
