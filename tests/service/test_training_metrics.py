"""A training run's or a search's progress as Prometheus gauges, served on their own port like `convray train
--metrics-port` and `convray tune --metrics-port`."""

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from convray.service.metrics import SearchMetrics, TrainingMetrics
from convray.workers.progress import EpochProgress
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


def test_a_search_shows_which_trial_runs_of_how_many_its_epochs_failures_and_held_out_accuracy():
    search = SearchMetrics(CollectorRegistry(), "digits", trials=3, epochs=2)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=search.registry)
    try:
        model = {"model": "digits"}
        before = scrape(server.server_port)  # what the search will run, from its start
        assert (before.value("convray_tune_trials", **model), before.value("convray_train_epochs", **model)) == (3, 2)
        assert before.value("convray_tune_trials_failed", **model) == 0
        search.trial_started(1)
        search.epoch_finished(EpochProgress(1, 2, 0.7, 0.8, 500.0), val_accuracy=0.85)
        search.trial_failed()
        search.trial_started(2)
        starting = scrape(server.server_port)
        search.epoch_finished(EpochProgress(2, 2, 0.4, 0.9, 600.0), val_accuracy=0.93)
        seen = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert (seen.value("convray_tune_trial", **model), seen.value("convray_tune_trials", **model)) == (2, 3)
    assert seen.value("convray_tune_trials_failed", **model) == 1
    assert seen.value("convray_tune_val_accuracy", **model) == 0.93
    assert (seen.value("convray_train_epoch", **model), seen.value("convray_train_epochs", **model)) == (2, 2)
    assert seen.value("convray_train_loss", **model) == 0.4
    # a new trial shows epoch 0, not the last trial's figures
    assert starting.value("convray_train_epoch", **model) == 0 and starting.value("convray_tune_trial", **model) == 2
    assert not {"convray_train_loss", "convray_tune_val_accuracy"} & starting.names()
