"""convray train on Ray Train: two CPU workers on the test run's local Ray, a worker that dies, and --resume."""

import os
import re
import time

import pytest

from convray.workers.ray_train import choose_run_name, first_cause
from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, train_and_publish
from convray.workers.train_config import TrainingFailed

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_state_on_failure")]


def two_workers(tmp_path, **overrides) -> TrainConfig:
    """Two workers of half a logical CPU each, so they fit beside the servers other tests keep running."""
    fields = {"workers": 2, "cpus_per_worker": 0.5, "epochs": 4, "storage_path": str(tmp_path / "runs")}
    return TrainConfig(**{**fields, **overrides})


def test_resume_continues_an_interrupted_run_and_a_dead_worker_is_replaced_from_the_last_checkpoint(
    ray_address, tmp_path
):
    """1. Rank 0 dies at the start of epoch 2 and no restart is allowed: the run fails, epoch 1 checkpointed.
    2. --resume continues that run from epoch 2. Rank 0 dies again at the start of epoch 3; Ray Train
    replaces the worker group, which restores epoch 2's checkpoint and finishes. Every epoch ran once."""
    name = "digits-20260101-000000-000000"
    # Found in review: the failure was Ray's 150-line traceback; it is one line saying how to continue.
    with pytest.raises(TrainingFailed, match=rf"^run {name} failed .*: continue it with --resume --run-name {name}$"):
        train_and_publish(two_workers(tmp_path, fail_at_epoch=2, max_failures=0, run_name=name), tmp_path, "digits")
    assert not (tmp_path / "digits").exists()

    resumed = two_workers(tmp_path, resume=True, fail_at_epoch=3, max_failures=1)
    assert choose_run_name(resumed, "digits") == name
    lines = []
    out = train_and_publish(resumed, tmp_path, "digits", log=lines.append)
    history = ModelRepository(tmp_path).load("digits", 1).metadata.metrics["history"]
    assert [(r["epoch"], r.get("resumed_after_epoch")) for r in history] == [(1, None), (2, 1), (3, 2), (4, None)]
    assert history[-1]["val_accuracy"] > 0.8
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / name).glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0003", "checkpoint_0004"]  # every epoch saved, the last two kept
    assert (out / "training_curve.png").stat().st_size > 1000 and f"run {name}" in lines[0]


def test_a_failed_runs_cause_is_the_lowest_ranks_error_not_a_side_effect_on_another_rank():
    """Found in review: the last line of Ray's message was rank 1's gloo "Connection closed by peer"."""
    import ray.train

    failures = {
        1: RuntimeError("[gloo] Connection closed by peer"),
        0: RuntimeError("Traceback...\nActorDiedError: rank 0 died"),
    }
    assert first_cause(ray.train.WorkerGroupError("both", failures)) == "ActorDiedError: rank 0 died"
    assert first_cause(ray.train.ControllerError(ValueError("no such resource"))).endswith("no such resource")


def test_resume_continues_this_models_latest_run_not_one_of_a_model_whose_name_starts_the_same(tmp_path):
    for run, age_s in (("digits-20261125-101010-000001", 20), ("digits-v2-20261125-111111-000002", 10)):
        checkpoint = tmp_path / run / "checkpoint_0001"
        checkpoint.mkdir(parents=True)
        os.utime(checkpoint, (time.time() - age_s, time.time() - age_s))  # digits-v2's run is the newer one
    config = TrainConfig(resume=True, storage_path=str(tmp_path))
    assert choose_run_name(config, "digits") == "digits-20261125-101010-000001"
    assert choose_run_name(config, "digits-v2") == "digits-v2-20261125-111111-000002"


def test_resume_without_an_earlier_run_says_so(tmp_path):
    with pytest.raises(ValueError, match="no checkpointed run of 'digits'"):
        choose_run_name(TrainConfig(resume=True, storage_path=str(tmp_path)), "digits")


def checkpointed_run(tmp_path, name: str, config: TrainConfig, spec: dict | None = None) -> None:
    """A run directory whose checkpoint holds ``config``'s run settings (and ``spec``), as train_loop saves them."""
    import torch

    from convray.workers.ray_train import STATE_FILE
    from convray.workers.train_config import run_settings

    checkpoint = tmp_path / name / "checkpoint_0002"
    checkpoint.mkdir(parents=True)
    settings = run_settings(config) | ({"spec": spec} if spec is not None else {})
    torch.save({"history": [{}, {}], "run": settings}, checkpoint / STATE_FILE)
    (tmp_path / name / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, beside the checkpoints: newer


RUN = "digits-20261125-101010-000001"


def test_a_plain_resume_carries_on_with_the_settings_the_run_was_started_with(tmp_path):
    """Started with the docs' RayJob flags; `--resume` alone must not fall back to the defaults."""
    from convray.workers.ray_train import check_continues_as_started, continue_run

    checkpointed_run(tmp_path, RUN, TrainConfig(epochs=30, workers=4, seed=3))
    given = TrainConfig(resume=True, storage_path=str(tmp_path))
    config = continue_run(given, "digits", given={"resume", "storage_path"})
    assert (config.run_name, config.epochs, config.workers, config.seed) == (RUN, 30, 4, 3)
    check_continues_as_started(config)  # nothing differs


def test_going_on_with_settings_that_shape_the_run_changed_names_each_and_refuses(tmp_path):
    """More epochs would step the checkpoint's one-cycle schedule past its end; a new rate would be ignored; more
    workers change the steps per epoch (the same end, at the last epoch)."""
    from convray.workers.ray_train import check_continues_as_started, continue_run

    checkpointed_run(tmp_path, RUN, TrainConfig(epochs=3, max_lr=0.2, workers=4))
    given = TrainConfig(epochs=5, max_lr=0.1, workers=5, resume=True, storage_path=str(tmp_path))
    config = continue_run(given, "digits", given={"epochs", "max_lr", "workers", "resume", "storage_path"})
    with pytest.raises(ValueError) as refused:
        check_continues_as_started(config)
    assert str(refused.value) == (
        f"run {RUN} has checkpoints and goes on as it was started, but these settings differ from its own "
        "(epochs: 3 -> 5; max_lr: 0.2 -> 0.1; workers: 4 -> 5); leave them out or give the run's values, or train "
        "a new run"
    )


def test_naming_an_existing_run_is_checked_the_same_way(tmp_path):
    """Ray Train restores a run by its name, with or without --resume."""
    from convray.workers.ray_train import check_continues_as_started

    checkpointed_run(tmp_path, RUN, TrainConfig(epochs=3))
    with pytest.raises(ValueError, match=r"epochs: 3 -> 40"):
        check_continues_as_started(TrainConfig(epochs=40, run_name=RUN, storage_path=str(tmp_path)))
    check_continues_as_started(TrainConfig(epochs=40, run_name="a-new-run", storage_path=str(tmp_path)))


def test_the_preset_does_not_count_where_a_spec_file_overrides_it(tmp_path):
    from convray.workers.ray_train import check_continues_as_started

    checkpointed_run(tmp_path, RUN, TrainConfig(spec_file="spec.json", preset="digits-small"))
    check_continues_as_started(
        TrainConfig(spec_file="spec.json", preset="other", run_name=RUN, storage_path=str(tmp_path))
    )


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    from convray.workers.ray_train import STATE_FILE, check_continues_as_started

    checkpointed_run(tmp_path, RUN, TrainConfig())
    (tmp_path / RUN / "checkpoint_0002" / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"cannot read the checkpoint .*checkpoint_0002"):
        check_continues_as_started(TrainConfig(run_name=RUN, storage_path=str(tmp_path)))


def test_a_last_checkpoint_cut_short_does_not_hide_the_runs_settings_in_the_one_before(tmp_path):
    """Found in review: the newest checkpoint directory alone was read, so a run stopped while writing it could
    not be resumed, where Ray Train restores the one before."""
    from convray.workers.ray_train import STATE_FILE, check_continues_as_started

    checkpointed_run(tmp_path, RUN, TrainConfig(epochs=3))
    cut_short = tmp_path / RUN / "checkpoint_0003"
    cut_short.mkdir()
    (cut_short / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    os.utime(tmp_path / RUN / "checkpoint_0002", (1, 1))  # the older of the two, whatever the clock's resolution
    with pytest.raises(ValueError, match=r"epochs: 3 -> 40"):
        check_continues_as_started(TrainConfig(epochs=40, run_name=RUN, storage_path=str(tmp_path)))
    check_continues_as_started(TrainConfig(epochs=3, run_name=RUN, storage_path=str(tmp_path)))


def test_a_spec_file_edited_since_the_run_started_is_refused(tmp_path):
    """Found in review: only the spec file's name was compared, so an edited spec resumed as another network
    (or failed in each worker on the weights' shapes)."""
    import json

    from convray.workers.ray_train import check_continues_as_started
    from convray.workers.spec import PRESETS, CNNSpec

    spec = CNNSpec.model_validate(PRESETS["digits-small"]).model_dump(mode="json")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    checkpointed_run(tmp_path, RUN, TrainConfig(spec_file=str(spec_file)), spec=spec)
    config = TrainConfig(spec_file=str(spec_file), run_name=RUN, storage_path=str(tmp_path))
    check_continues_as_started(config)  # the same spec
    copy = tmp_path / "elsewhere" / "same-spec.json"  # the same contents by another path: the same run
    copy.parent.mkdir()
    copy.write_text(spec_file.read_text())
    check_continues_as_started(TrainConfig(spec_file=str(copy), run_name=RUN, storage_path=str(tmp_path)))
    edited = json.loads(json.dumps(spec))
    edited["blocks"][-1] = {"type": "dropout", "rate": 0.3}  # the same weights' shapes, another network
    assert edited != spec
    spec_file.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"the spec in {re.escape(str(spec_file))} \(edited since the run started\)"):
        check_continues_as_started(config)


def test_resume_with_a_run_name_continues_that_run_whatever_it_is_called(tmp_path):
    """Found in review: --run-name was ignored under --resume, which took the latest stamped run instead, so a
    run given its own name could never be resumed."""
    checkpointed_run(tmp_path, "my-experiment", TrainConfig())
    checkpointed_run(tmp_path, RUN, TrainConfig())
    config = TrainConfig(resume=True, run_name="my-experiment", storage_path=str(tmp_path))
    assert choose_run_name(config, "digits") == "my-experiment"
    with pytest.raises(ValueError, match="run 'nothing-here' has no checkpoint"):
        choose_run_name(TrainConfig(resume=True, run_name="nothing-here", storage_path=str(tmp_path)), "digits")


def test_a_run_already_published_is_not_trained_on_nor_published_again(tmp_path):
    """Found in review: Ray Train restores a finished run by name and returns at once, so --resume published the
    same weights again as a new version."""
    from convray.workers.ray_train import mark_published

    checkpointed_run(tmp_path / "runs", RUN, TrainConfig())
    config = TrainConfig(workers=1, run_name=RUN, storage_path=str(tmp_path / "runs"))
    mark_published(config, "digits", 3)
    with pytest.raises(ValueError, match=f"run {RUN} is finished and was published as digits version 3"):
        train_and_publish(config, tmp_path / "repo", "digits")
    assert ModelRepository(tmp_path / "repo").versions("digits") == []


def test_workers_an_embedded_ray_cannot_hold_are_refused_instead_of_waited_for_for_ever(ray_address):
    """Found in review: `--workers 3` on a 2-CPU machine, or `--gpu` on one without a GPU, never started and never
    failed (Ray Train retries placing the group without end)."""
    import ray

    from convray.workers.ray_train import refuse_what_cannot_fit

    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    with pytest.raises(ValueError, match=rf"ask for {cpus + 1:g} CPU in all \(1 each\) and this local Ray has"):
        refuse_what_cannot_fit(TrainConfig(workers=int(cpus) + 1, cpus_per_worker=1))
    with pytest.raises(ValueError, match="GPU in all"):
        refuse_what_cannot_fit(TrainConfig(workers=int(gpus) + 1, gpu=True))
    refuse_what_cannot_fit(TrainConfig(workers=2, cpus_per_worker=0.5))  # fits: no error
