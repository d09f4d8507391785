"""A training run's progress as Prometheus gauges, served on their own port like `convray train --metrics-port`."""

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from convray.service.metrics import TrainingMetrics
from convray.workers.train import TrainConfig, train
from tests.deploy.tools import scrape


@pytest.fixture
def endpoint():
    progress = TrainingMetrics(CollectorRegistry(), "digits-next")
    server, _ = start_http_server(0, addr="127.0.0.1", registry=progress.registry)
    yield progress, server.server_port
    server.shutdown()
    server.server_close()


def test_each_epoch_of_a_real_run_updates_the_progress_gauges(endpoint):
    progress, port = endpoint
    seen = []

    def on_epoch(epoch):
        progress.observe_epoch(epoch)
        seen.append(scrape(port))

    lines = []
    train(TrainConfig(epochs=2, threads=1, workers=0), log=lines.append, on_epoch=on_epoch)
    first, last = seen
    model = {"model": "digits-next"}
    assert first.value("convray_train_epoch", **model) == 1 and last.value("convray_train_epoch", **model) == 2
    assert last.value("convray_train_epochs", **model) == 2
    assert 0 < last.value("convray_train_loss", **model) < first.value("convray_train_loss", **model)
    assert 0.5 < last.value("convray_train_accuracy", **model) <= 1
    assert last.value("convray_train_images_per_second", **model) > 0
    assert lines[0].startswith("epoch   1/2  loss ") and " acc " in lines[0]


def test_no_progress_series_before_the_first_epoch(endpoint):
    _, port = endpoint
    assert not {name for name in scrape(port).names() if name.startswith("convray_train")}
