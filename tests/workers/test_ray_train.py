"""convray train on Ray Train: two CPU workers on the test run's local Ray, a worker that dies, and --resume."""

import pytest

from convray.workers.ray_train import choose_run_name
from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, train_and_publish

pytestmark = pytest.mark.integration


def two_workers(tmp_path, **overrides) -> TrainConfig:
    """Two workers of half a logical CPU each, so they fit beside the servers other tests keep running."""
    fields = {"workers": 2, "cpus_per_worker": 0.5, "epochs": 3, "storage_path": str(tmp_path / "runs")}
    return TrainConfig(**{**fields, **overrides})


def test_a_worker_that_dies_is_replaced_and_the_run_continues_from_the_last_checkpoint(ray_address, tmp_path):
    """Rank 0 exits at the start of epoch 2 (first attempt only); Ray Train restarts the worker group, which
    restores epoch 1's checkpoint, so epoch 2 runs once more and the run finishes and publishes."""
    config = two_workers(tmp_path, fail_at_epoch=2, run_name="digits-failure")
    out = train_and_publish(config, tmp_path / "repo", "digits", log=lambda line: None)
    history = ModelRepository(tmp_path / "repo").load("digits").metadata.metrics["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r.get("resumed_after_epoch") for r in history] == [None, 1, None]
    assert history[-1]["val_accuracy"] > 0.8
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "digits-failure").glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_0002", "checkpoint_0003"]  # every epoch saved, the last two kept
    assert (out / "training_curve.png").stat().st_size > 1000


def test_resume_continues_an_interrupted_run_from_its_last_checkpoint(ray_address, tmp_path):
    """A run that fails for good after two checkpointed epochs is continued by --resume, not restarted."""
    import ray.train

    failing = two_workers(tmp_path, fail_at_epoch=3, max_failures=0, run_name="digits-20260101-000000-000000")
    with pytest.raises(ray.train.TrainingFailedError):
        train_and_publish(failing, tmp_path / "repo", "digits", log=lambda line: None)
    assert not (tmp_path / "repo" / "digits").exists()

    resumed = two_workers(tmp_path, resume=True)
    assert choose_run_name(resumed, "digits") == "digits-20260101-000000-000000"
    train_and_publish(resumed, tmp_path / "repo", "digits", log=lambda line: None)
    history = ModelRepository(tmp_path / "repo").load("digits", 1).metadata.metrics["history"]
    assert [(r["epoch"], r.get("resumed_after_epoch")) for r in history] == [(1, None), (2, None), (3, 2)]


def test_resume_without_an_earlier_run_says_so(tmp_path):
    with pytest.raises(ValueError, match="no checkpointed run of 'digits'"):
        choose_run_name(TrainConfig(resume=True, storage_path=str(tmp_path)), "digits")
