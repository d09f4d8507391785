"""Settings: defaults, environment variables and CLI flags all land in one typed place."""

import pytest
from convray.service.cli import SERVE_FLAGS, build_parser, settings_from_args
from convray.service.config import Settings
from pydantic import ValidationError


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_safe_and_bounded():
    settings = Settings()
    assert settings.server.host == "localhost" and settings.server.port == 50051
    assert settings.server.metrics_port == 9100
    assert settings.models.model_repo.as_posix() == "models"
    assert settings.batching.max_queue > 0
    assert settings.workers.ray_address is None


def test_environment_variables_set_nested_fields(monkeypatch):
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("CONVRAY_WORKERS__GPUS_PER_REPLICA", "0.5")
    settings = Settings()
    assert settings.batching.max_batch_size == 64
    assert settings.workers.gpus_per_replica == 0.5


def test_flags_override_the_environment_and_keep_the_rest_of_the_group(monkeypatch):
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_QUEUE", "7")
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_BATCH_SIZE", "64")
    settings = settings_from_args(serve_args("--max-batch-size", "8", "--port", "6000", "--ray-address", "auto"))
    assert settings.batching.max_batch_size == 8
    assert settings.batching.max_queue == 7
    assert settings.server.port == 6000
    assert settings.workers.ray_address == "auto"


def test_every_serve_flag_maps_onto_a_real_field():
    for flag, (group, field) in SERVE_FLAGS.items():
        assert field in Settings.model_fields[group].annotation.model_fields, flag


def test_no_metrics_disables_the_endpoint():
    assert settings_from_args(serve_args("--no-metrics")).server.metrics_port is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--port", "70000"], "port"),
        (["--device", "tpu"], "device"),
        (["--port", "9100"], "metrics_port must differ from server.port"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(argv, message):
    with pytest.raises(ValidationError, match=message):
        settings_from_args(serve_args(*argv))


def test_help_text_comes_from_the_field_docstrings():
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "At most this many requests share one Ray call" in text
    assert "CONVRAY_BATCHING__MAX_BATCH_SIZE" in text
