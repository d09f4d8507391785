"""The training loop without Ray (--workers 0): statistics, spec fitting, schedules, AMP, a short run."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from convray.workers.repository import ModelRepository
from convray.workers.train import (
    LocalSession,
    TrainConfig,
    amp_dtype,
    channel_stats,
    load_spec,
    make_optimizer,
    prepare_data,
    train_and_publish,
    train_loop,
)


def test_channel_stats_are_on_the_0_to_1_scale():
    images = np.stack([np.zeros((1, 2, 2), np.uint8), np.full((1, 2, 2), 255, np.uint8)])
    stats = channel_stats(images)
    assert stats.mean == [0.5] and stats.std == [0.5]


def test_a_short_run_publishes_a_loadable_version_with_metrics(tmp_path):
    lines = []
    out = train_and_publish(TrainConfig(epochs=2, seed=1, workers=0), tmp_path, "tiny", log=lines.append)
    assert out == tmp_path / "tiny" / "1"
    loaded = ModelRepository(tmp_path).load("tiny", 1)
    metrics = loaded.metadata.metrics
    assert 0.5 < metrics["accuracy"] <= 1.0  # two epochs already learn most digits
    assert len(metrics["confusion_matrix"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 360
    assert set(metrics["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert any(line.startswith("epoch   2/2") for line in lines)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert metrics["history"][1]["loss"] < metrics["history"][0]["loss"]
    for plot in ("training_curve.png", "confusion_matrix.png"):
        assert Image.open(out / plot).format == "PNG", plot
    assert lines[-1].startswith(f"published {out}  held-out accuracy {metrics['accuracy']:.4f}")


def test_the_same_seed_trains_the_same_weights():
    config = TrainConfig(epochs=1, seed=3, workers=0)
    data = prepare_data(config)
    first, _ = train_loop(config, data, LocalSession(config, lambda line: None, None))
    second, _ = train_loop(config, data, LocalSession(config, lambda line: None, None))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class CheckpointingSession(LocalSession):
    """This process, keeping each epoch's checkpoint as Ray Train would, and able to stop after an epoch."""

    def __init__(self, config: TrainConfig, restored: dict | None = None, stop_after: int | None = None) -> None:
        super().__init__(config, lambda line: None, None)
        self.restored, self.stop_after, self.saved = restored, stop_after, None

    def restore(self) -> dict | None:
        return copy.deepcopy(self.restored)

    def report(self, progress, record, state) -> None:
        self.saved = copy.deepcopy(state())
        if progress.epoch == self.stop_after:
            raise KeyboardInterrupt  # the interruption


def test_a_run_resumed_from_its_checkpoint_trains_the_weights_of_an_uninterrupted_one():
    """With dropout (digits-small has 0.1), whose masks come from torch's global generator."""
    config = TrainConfig(epochs=3, seed=0, workers=0, threads=1)
    data = prepare_data(config)
    uninterrupted, _ = train_loop(config, data, CheckpointingSession(config))
    interrupted = CheckpointingSession(config, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        train_loop(config, data, interrupted)
    resumed, history = train_loop(config, data, CheckpointingSession(config, restored=interrupted.saved))
    assert [record["epoch"] for record in history] == [1, 2, 3]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_preset_takes_its_channels_and_classes_from_the_data_and_a_spec_file_must_match(tmp_path):
    config = TrainConfig(dataset="npz:unused")
    rgb = type("Data", (), {"images": np.zeros((4, 3, 8, 8), np.uint8), "label_names": ["a", "b", "c"]})()
    spec = load_spec(config, rgb)
    assert (spec.in_channels, spec.num_classes) == (3, 3)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(load_spec(TrainConfig()).model_dump_json())  # 1 channel, 10 classes
    with pytest.raises(ValueError, match="spec has 1 channel"):
        load_spec(TrainConfig(spec_file=str(spec_file)), rgb)


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine", "constant"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_optimizer_and_schedule_steps_through_the_whole_run(optimizer, schedule):
    config = TrainConfig(optimizer=optimizer, schedule=schedule, epochs=2, max_lr=0.1)
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(config, model, steps_per_epoch=3)
    rates = []
    for _ in range(6):  # the learning rate each step uses
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0 <= r <= 0.1 + 1e-9 for r in rates)
    assert (rates[-1] < 0.01) == (schedule != "constant")  # annealed towards 0 by the last step


def momentum_per_step(opt, sched, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize(("momentum", "low", "high"), [(0.9, 0.85, 0.95), (0.8, 0.75, 0.85), (0.99, 0.94, 0.999)])
def test_one_cycle_moves_momentum_around_the_one_asked_for(momentum, low, high):
    """Highest while the rate is lowest (the first step), lowest at the rate's peak."""
    config = TrainConfig(schedule="one_cycle", momentum=momentum, epochs=1)
    seen = momentum_per_step(*make_optimizer(config, torch.nn.Linear(2, 2), steps_per_epoch=10), steps=10)
    assert seen[0] == high and min(seen) == pytest.approx(low, abs=1e-3)


def test_adamw_takes_momentum_as_its_beta1_under_every_schedule():
    for schedule in ("cosine", "constant"):
        opt, _ = make_optimizer(
            TrainConfig(optimizer="adamw", schedule=schedule, momentum=0.8), torch.nn.Linear(2, 2), 3
        )
        assert opt.param_groups[0]["betas"] == (0.8, 0.999)


def test_at_the_default_momentum_one_cycle_is_torchs_own_cycle_to_the_bit():
    """So the shipped model's training command trains the same weights as before --momentum counted here."""
    ours = momentum_per_step(*make_optimizer(TrainConfig(epochs=1, max_lr=0.1), torch.nn.Linear(2, 2), 10), steps=10)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, nesterov=True)
    torchs = momentum_per_step(opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10), steps=10)
    assert ours == torchs


def test_mixed_precision_only_on_a_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(TrainConfig(amp="bf16"), cpu) is None
    assert amp_dtype(TrainConfig(amp="bf16"), cuda) is torch.bfloat16
    assert amp_dtype(TrainConfig(amp="fp16"), cuda) is torch.float16
    assert amp_dtype(TrainConfig(amp="none"), cuda) is None
