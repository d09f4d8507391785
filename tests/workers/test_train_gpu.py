"""Training on a GPU, in this process and on a Ray Train worker: it learns, with and without mixed precision.

Skipped where torch sees no GPU (CI); scripts/gpu_lease.sh runs these on a lent GPU machine.
"""

import pytest
import torch

from convray.workers.repository import ModelRepository
from convray.workers.train import TrainConfig, train, train_and_publish

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_in_this_process_on_the_gpu_learns_the_digits(amp):
    """fp16 also exercises the gradient scaler; each epoch's loss and accuracy come back from the device."""
    lines = []
    model, metadata = train(TrainConfig(workers=0, gpu=True, amp=amp, epochs=3, seed=0), log=lines.append)
    assert metadata.metrics["accuracy"] > 0.8, lines
    assert next(model.parameters()).device.type == "cpu"  # handed back for publishing
    assert metadata.training["config"]["gpu"] and metadata.training["config"]["amp"] == amp


def test_training_on_a_ray_train_worker_with_a_gpu_publishes_a_version(ray_address, tmp_path):
    config = TrainConfig(workers=1, gpu=True, cpus_per_worker=1, epochs=3, storage_path=str(tmp_path / "runs"))
    train_and_publish(config, tmp_path, "digits", log=lambda line: None)
    metrics = ModelRepository(tmp_path).load("digits", 1).metadata.metrics
    assert metrics["accuracy"] > 0.8
