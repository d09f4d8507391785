"""The training loop without Ray (--workers 0): statistics, spec fitting, schedules, AMP, a short run."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from convray.workers.repository import ModelRepository
from convray.workers.spec import PRESETS
from convray.workers.train import (
    LocalSession,
    TrainConfig,
    amp_dtype,
    batch_bounds,
    channel_stats,
    classification_loss,
    load_spec,
    make_optimizer,
    prepare_data,
    train,
    train_and_publish,
    train_loop,
)
from convray.workers.transforms import normalise


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


def spec_file(tmp_path, **changes) -> str:
    """The digits preset, changed as given, written as a --spec file."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**PRESETS["digits-small"], "num_classes": 10, **changes}))
    return str(path)


def test_a_sigmoid_head_learns_each_class_as_its_own_yes_or_no(tmp_path):
    """Found in review: trained with softmax's cross-entropy, a sigmoid model's served probabilities of one
    digit summed to about 5, several classes over 0.79 each."""
    config = TrainConfig(spec_file=spec_file(tmp_path, output="sigmoid"), epochs=3, seed=0, workers=0)
    model, metadata = train(config, log=lambda line: None)
    held_out, norm = prepare_data(config).held_out, metadata.input.normalisation
    x = normalise(torch.from_numpy(held_out.images), norm.mean, norm.std)
    model.eval()
    with torch.inference_mode():
        probabilities = torch.sigmoid(model(x))
    assert metadata.metrics["accuracy"] > 0.5
    assert probabilities.sum(1).mean() < 1.5  # one class near 1, the others near 0


def test_sigmoid_loss_is_a_binary_cross_entropy_per_class_and_softmax_loss_the_usual_one():
    logits, labels = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(classification_loss(logits, labels, "sigmoid", 0.0), expected)
    smoothed = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.95, 0.05, 0.05]]))
    assert torch.allclose(classification_loss(logits, labels, "sigmoid", 0.1), smoothed)
    assert torch.allclose(
        classification_loss(logits, labels, "softmax", 0.0), torch.nn.functional.cross_entropy(logits, labels)
    )


def test_a_last_batch_of_one_image_joins_the_one_before():
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(1, 4) == [(0, 1)]  # one image in all still trains


def test_batch_norm_on_a_one_pixel_map_trains_when_an_epoch_would_end_with_one_image(tmp_path):
    """Found in review: 1437 training digits in batches of 4 leave one image, and batch norm over a 1x1 map
    raised "Expected more than 1 value per channel" at the end of the first epoch."""
    blocks = [{"type": "conv", "filters": 8, "kernel_size": 8, "padding": "valid", "batch_norm": True}]
    config = TrainConfig(spec_file=spec_file(tmp_path, blocks=blocks), epochs=1, batch_size=4, workers=0)
    assert len(prepare_data(config).train.labels) % 4 == 1
    _, metadata = train(config, log=lambda line: None)  # raised before
    (epoch,) = metadata.metrics["history"]
    assert math.isfinite(epoch["loss"])


def test_a_spec_file_with_a_mistake_is_refused_in_one_line_naming_the_file_and_field(tmp_path):
    path = spec_file(tmp_path, blocks=[{"type": "conv", "filters": 8, "stride": 0}])
    with pytest.raises(ValueError) as refused:
        load_spec(TrainConfig(spec_file=path))
    assert str(refused.value) == f"{path}: blocks.0.conv.stride: Input should be greater than 0"
