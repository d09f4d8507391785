"""convray tune: spec choices map onto valid specs, a two-trial search publishes its best trial, and only a trial
that ran all its epochs can win."""

import json
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from ray import cloudpickle

from convray.workers.ray_train import STATE_FILE
from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, load_spec
from convray.workers.train_config import TrainingFailed
from convray.workers.tune import (
    CHOICE_FILE,
    best_finished,
    config_for,
    progress_callback,
    spec_for,
    tune_and_publish,
)

CHOICE = {
    "head": "fc", "pool": "avg", "activation": "leaky_relu", "dropout": 0.25, "width": 0.5,
    "optimizer": "adamw", "max_lr": 0.01, "weight_decay": 1e-4, "label_smoothing": 0.1,
}  # fmt: skip


def test_a_choice_changes_the_head_pooling_activation_dropout_and_width_of_the_spec():
    base = load_spec(TrainConfig())
    spec = spec_for(base, CHOICE)
    convs = [b for b in spec.blocks if b.type == "conv"]
    assert [c.filters for c in convs] == [16, 16, 32]
    assert {c.activation.kind for c in convs} == {"leaky_relu"}
    assert {b.kind for b in spec.blocks if b.type == "pool"} == {"avg"}
    assert [b.rate for b in spec.blocks if b.type == "dropout"] == [0.25]
    assert spec.head.type == "fc" and spec.head.dropout == 0.25
    assert config_for(TrainConfig(), CHOICE).optimizer == "adamw"


@pytest.mark.integration
@pytest.mark.usefixtures("ray_state_on_failure")
def test_a_two_trial_search_publishes_the_best_trial(ray_address, tmp_path):
    config = TrainConfig(workers=1, cpus_per_worker=0.5, epochs=2, storage_path=str(tmp_path / "runs"))
    lines, progress = [], Recorder()
    out = tune_and_publish(config, 2, tmp_path / "repo", "digits", log=lines.append, progress=progress)
    loaded = ModelRepository(tmp_path / "repo").load("digits")
    tune = loaded.metadata.training["tune"]
    assert tune["trials"] == 2 and set(tune["best"]) >= {"head", "pool", "width", "optimizer"}
    assert loaded.metadata.spec.head.type == tune["best"]["head"]
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == 2
    best_seen = max(float(line.split("val_accuracy ")[1].split()[0]) for line in trial_lines)
    assert loaded.metadata.metrics["history"][-1]["val_accuracy"] == pytest.approx(best_seen, abs=1e-4)
    assert (out / "training_curve.png").exists()
    # --metrics-port's gauges are told of each trial and its epochs, the last one too (read from the trial's
    # checkpoint when Tune never received it), with the held-out accuracy the trial was judged by
    assert [event for event in progress.events if event[0] == "trial"] == [("trial", 1), ("trial", 2)]
    last_epochs = [round(event[3], 4) for event in progress.events if event[:2] == ("epoch", 2)]
    judged = [float(line.split("val_accuracy ")[1].split()[0]) for line in trial_lines]  # sorted by trial id
    assert sorted(last_epochs) == sorted(judged) and ("failed",) not in progress.events
    (search,) = (tmp_path / "runs").iterdir()  # one directory per search: its trials' runs and Tune's state
    assert search.name == loaded.metadata.training["tune"]["search"]
    assert len(list(search.glob("trial-*/checkpoint_0002"))) == 2 and list(search.glob("experiment_state-*.json"))


class Recorder:
    """A ``SearchProgress`` that records what it is told; like the real one's gauges, it cannot be pickled."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()  # Tune pickles its callbacks: `convray tune --metrics-port` failed on this

    def trial_started(self, number):
        self.events.append(("trial", number))

    def epoch_finished(self, progress, val_accuracy):
        self.events.append(("epoch", progress.epoch, progress.epochs, val_accuracy))

    def trial_failed(self):
        self.events.append(("failed",))


@dataclass
class TrialResult:
    """What ``best_finished`` reads of a Ray Tune ``Result``."""

    metrics: dict
    error: Exception | None = None
    config: dict = field(default_factory=dict)


class Results(list):
    """What ``best_finished`` reads of a Ray Tune ``ResultGrid``: its results and how many ended which way."""

    def __init__(self, results, terminated, errors):
        super().__init__(results)
        self.num_terminated, self.num_errors = terminated, errors


def trial_run(storage, trial_id, epochs_done, accuracy):
    """A trial's Ray Train run on disk as ``run_trial`` leaves it: its choice and its last two checkpoints."""
    run = storage / f"trial-{trial_id}"
    run.mkdir(parents=True)
    (run / CHOICE_FILE).write_text(json.dumps({**CHOICE, "width": accuracy}))
    history = [
        {"epoch": e, "loss": 1 / e, "accuracy": 0.5, "images_per_second": 100.0, "val_accuracy": 0.0}
        for e in range(1, epochs_done + 1)
    ]
    history[-1]["val_accuracy"] = accuracy
    for epoch in range(max(1, epochs_done - 1), epochs_done + 1):
        (run / f"checkpoint_{epoch:04d}").mkdir()
        torch.save({"history": history[:epoch]}, run / f"checkpoint_{epoch:04d}" / STATE_FILE)


def test_only_a_trial_whose_run_saved_its_last_epoch_can_win_and_failures_are_logged(tmp_path):
    """Ray's get_best_result ranked trials that had failed part-way, and one was published (review)."""
    trial_run(tmp_path, "a", 2, 0.99)  # failed at the start of epoch 3: the best accuracy, but not finished
    trial_run(tmp_path, "b", 3, 0.8)
    trial_run(tmp_path, "c", 3, 0.9)
    lines = []
    failure = RuntimeError("worker died\nWorkerGroupError: rank 0")
    results = Results([TrialResult({"trial_id": "a"}, failure), TrialResult({}), TrialResult({})], 2, 1)
    best = best_finished(results, 3, 3, "s", tmp_path, lines.append)
    assert (best.trial_id, best.val_accuracy, best.choice["width"]) == ("c", 0.9, 0.9)
    assert best.checkpoint == tmp_path / "trial-c" / "checkpoint_0003"
    assert lines[0].startswith("trial a: failed: WorkerGroupError: rank 0")
    assert [line.split("  ")[0] for line in lines[1:3]] == [
        "trial b: val_accuracy 0.8000",
        "trial c: val_accuracy 0.9000",
    ]
    assert lines[-1] == "1 of 3 trials failed; the best of the 2 that finished wins"


def test_a_trial_whose_last_epoch_tune_never_received_still_counts_from_its_run(tmp_path):
    """Seen here: TuneReportCallback's last report is lost now and then, so Tune held the epoch before, and its
    checkpoint would have been published as the trial's."""
    trial_run(tmp_path, "b", 3, 0.7)
    before_last = {
        "trial_id": "b",
        "epoch": 2,
        "val_accuracy": 0.0,
        "checkpoint_path": str(tmp_path / "trial-b" / "checkpoint_0002"),
    }
    best = best_finished(Results([TrialResult(before_last)], 1, 0), 1, 3, "s", tmp_path, lambda line: None)
    assert (best.checkpoint.name, best.val_accuracy) == ("checkpoint_0003", 0.7)


def test_an_interrupted_search_publishes_nothing(tmp_path):
    """Ctrl-C makes Tuner.fit return normally; Tune marks the trial it stopped TERMINATED, like a finished one,
    and leaves the rest unstarted (review): here trial b was stopped after 1 of 3 epochs and c never ran."""
    trial_run(tmp_path, "a", 3, 0.9)
    trial_run(tmp_path, "b", 1, 0.95)
    interrupted = Results([TrialResult({}), TrialResult({})], 2, 0)
    with pytest.raises(TrainingFailed, match=r"^search s was interrupted: 2 of 3 trials did not run to the end"):
        best_finished(interrupted, 3, 3, "s", tmp_path, lambda line: None)
    stopped_in_the_last_trial = Results([TrialResult({}), TrialResult({})], 2, 0)
    with pytest.raises(TrainingFailed, match=r"^search s was interrupted: 1 of 2 trials did not run to the end"):
        best_finished(stopped_in_the_last_trial, 2, 3, "s", tmp_path, lambda line: None)


def test_search_progress_gets_each_trials_last_epoch_from_its_checkpoint_when_tune_never_received_it(tmp_path):
    trial_run(tmp_path, "a", 3, 0.9)
    progress, trial = Recorder(), SimpleNamespace(trial_id="a")
    callback = progress_callback(progress, 3, tmp_path)
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    epoch_2 = {"epoch": 2, "loss": 0.5, "accuracy": 0.8, "images_per_second": 90.0, "val_accuracy": 0.7}
    callback.on_trial_result(iteration=2, trials=[trial], trial=trial, result={**epoch_2, "trial_id": "a"})
    callback.on_trial_result(iteration=2, trials=[trial], trial=trial, result={"done": True})  # not an epoch
    callback.on_trial_complete(iteration=3, trials=[trial], trial=trial)
    assert progress.events == [("trial", 1), ("epoch", 2, 3, 0.7), ("epoch", 3, 3, 0.9)]
    restored = cloudpickle.loads(cloudpickle.dumps(callback))  # Tune pickles it: without the metrics, which cannot be
    restored.on_trial_start(iteration=4, trials=[trial], trial=trial)
    assert len(progress.events) == 3


def test_search_progress_that_raises_is_logged_and_does_not_reach_tune(tmp_path, caplog):
    """Raised in a Tune callback, it would stop the search or mark a finished trial failed (review)."""

    class Broken(Recorder):
        def epoch_finished(self, progress, val_accuracy):
            raise OSError("disk full")

    trial_run(tmp_path, "a", 3, 0.9)
    trial = SimpleNamespace(trial_id="a")
    callback = progress_callback(Broken(), 3, tmp_path)
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    assert "search progress not reported (OSError: disk full)" in caplog.text


def test_a_trial_that_failed_after_saving_its_last_epoch_counts_as_failed_and_cannot_hide_an_interruption(tmp_path):
    """It was counted both as failed and as finished, so the sum of the two covered trial b, stopped part-way
    (review)."""
    trial_run(tmp_path, "a", 3, 0.99)  # its last epoch saved, then the trial failed
    trial_run(tmp_path, "b", 1, 0.5)  # stopped by Ctrl-C after 1 of 3 epochs: TERMINATED, no error
    trial_run(tmp_path, "c", 3, 0.9)
    failure = RuntimeError("lost the node\nActorDiedError: the actor died")
    results = Results([TrialResult({"trial_id": "a"}, failure), TrialResult({}), TrialResult({})], 2, 1)
    with pytest.raises(TrainingFailed, match=r"^search s was interrupted: 1 of 3 trials did not run to the end"):
        best_finished(results, 3, 3, "s", tmp_path, lambda line: None)
    (tmp_path / "trial-a" / "checkpoint_0003" / STATE_FILE).write_bytes(b"cut sho")  # nor, failed, as unreadable
    with pytest.raises(TrainingFailed, match=r"^search s was interrupted: 1 of 3 trials did not run to the end"):
        best_finished(results, 3, 3, "s", tmp_path, lambda line: None)
    (tmp_path / "trial-b" / "checkpoint_0003").mkdir()  # had b finished, c, not the failed a, would win
    torch.save({"history": [{"epoch": 3, "val_accuracy": 0.8}]}, tmp_path / "trial-b" / "checkpoint_0003" / STATE_FILE)
    assert best_finished(results, 3, 3, "s", tmp_path, lambda line: None).trial_id == "c"


def test_a_trial_whose_last_checkpoint_cannot_be_read_is_left_out_as_failed(tmp_path):
    """Ray Train copies a checkpoint into place file by file: a worker that dies mid-copy leaves part of one."""
    trial_run(tmp_path, "a", 3, 0.9)
    trial_run(tmp_path, "b", 3, 0.95)
    (tmp_path / "trial-b" / "checkpoint_0003" / STATE_FILE).write_bytes(b"cut sho")
    lines = []
    best = best_finished(Results([TrialResult({}), TrialResult({})], 2, 0), 2, 3, "s", tmp_path, lines.append)
    assert best.trial_id == "a"
    assert any(line.startswith("trial b: its last checkpoint cannot be read (") for line in lines)


def test_a_search_whose_every_trial_failed_says_so(tmp_path):
    trial_run(tmp_path, "a", 1, 0.5)
    failed = Results([TrialResult({}, RuntimeError("x")), TrialResult({}, RuntimeError("y"))], 0, 2)
    with pytest.raises(TrainingFailed, match=r"^no trial of search s finished; nothing published"):
        best_finished(failed, 2, 3, "s", tmp_path, lambda line: None)


@pytest.mark.integration
@pytest.mark.usefixtures("ray_state_on_failure")
def test_a_search_whose_trial_fails_part_way_publishes_nothing(ray_address, tmp_path):
    """The reviewer's case, for real: the trial dies at the start of epoch 2 of 2, with no restart allowed."""
    config = TrainConfig(
        workers=1, cpus_per_worker=0.5, epochs=2, fail_at_epoch=2, max_failures=0, storage_path=str(tmp_path / "runs")
    )
    progress = Recorder()
    with pytest.raises(TrainingFailed, match="no trial of search tune-digits-.* finished; nothing published"):
        tune_and_publish(config, 1, tmp_path / "repo", "digits", log=lambda line: None, progress=progress)
    assert progress.events[0] == ("trial", 1) and progress.events[-1] == ("failed",)
    assert not (tmp_path / "repo" / "digits").exists() or not any((tmp_path / "repo" / "digits").iterdir())
