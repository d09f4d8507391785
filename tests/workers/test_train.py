"""The single-process training loop: augmentation, statistics, and a short run that publishes."""

import numpy as np
import torch

from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, channel_stats, random_shift, train_and_publish


def test_random_shift_moves_content_by_at_most_the_limit_and_keeps_shape():
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 4, 4] = 255
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(image.repeat(64, 1, 1, 1), 1, generator)
    assert shifted.shape == (64, 1, 8, 8)
    positions = {tuple(map(int, (s[0] == 255).nonzero()[0])) for s in shifted}
    assert positions <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    assert len(positions) > 3  # it really moves things


def test_random_shift_of_zero_is_identity():
    x = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_channel_stats_are_on_the_0_to_1_scale():
    images = np.stack([np.zeros((1, 2, 2), np.uint8), np.full((1, 2, 2), 255, np.uint8)])
    stats = channel_stats(images)
    assert stats.mean == [0.5] and stats.std == [0.5]


def test_a_short_run_publishes_a_loadable_version_with_metrics(tmp_path):
    lines = []
    out = train_and_publish(TrainConfig(epochs=2, seed=1), tmp_path, "tiny", log=lines.append)
    assert out == tmp_path / "tiny" / "1"
    loaded = ModelRepository(tmp_path).load("tiny", 1)
    metrics = loaded.metadata.metrics
    assert 0.5 < metrics["accuracy"] <= 1.0  # two epochs already learn most digits
    assert len(metrics["confusion_matrix"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 360
    assert set(metrics["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert any(line.startswith("epoch   2/2") for line in lines)
