"""Settings: defaults, environment variables and CLI flags all land in one typed place."""

import pytest
from pydantic import ValidationError

from convray.service.cli import SERVE_FLAGS, build_parser, settings_from_args
from convray.service.config import Settings


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_are_safe_and_bounded():
    settings = Settings()
    assert settings.server.host == "localhost" and settings.server.port == 50051
    assert settings.server.metrics_port == 9100
    assert settings.models.model_repo.as_posix() == "models"
    assert settings.batching.max_queue > 0
    assert settings.workers.ray_address is None
    assert settings.models.control is False  # load and unload by request are off, as Triton's default


def test_environment_variables_set_nested_fields(monkeypatch):
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("CONVRAY_WORKERS__GPUS_PER_REPLICA", "0.5")
    settings = Settings()
    assert settings.batching.max_batch_size == 64
    assert settings.workers.gpus_per_replica == 0.5


def test_off_unsets_a_setting_that_may_be_unset_like_no_metrics_does(monkeypatch):
    monkeypatch.setenv("CONVRAY_SERVER__METRICS_PORT", "off")
    monkeypatch.setenv("CONVRAY_WORKERS__RAY_NUM_CPUS", "off")
    settings = Settings()
    assert settings.server.metrics_port is None and settings.workers.ray_num_cpus is None
    assert settings_from_args(serve_args("--metrics-port", "9200")).server.metrics_port == 9200  # a flag still wins
    assert settings_from_args(serve_args("--health-port", "off")).server.health_port is None  # flags too


def test_off_keeps_its_own_meaning_where_a_setting_cannot_be_unset(monkeypatch):
    """A false boolean stays false, and a model may be called "off"."""
    monkeypatch.setenv("CONVRAY_BATCHING__DISPATCH_WHEN_IDLE", "off")
    monkeypatch.setenv("CONVRAY_MODELS__DEFAULT_MODEL", "off")
    settings = Settings()
    assert settings.batching.dispatch_when_idle is False and settings.models.default_model == "off"


def test_flags_override_the_environment_and_keep_the_rest_of_the_group(monkeypatch):
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_QUEUE", "7")
    monkeypatch.setenv("CONVRAY_BATCHING__MAX_BATCH_SIZE", "64")
    settings = settings_from_args(serve_args("--max-batch-size", "8", "--port", "6000", "--ray-address", "auto"))
    assert settings.batching.max_batch_size == 8
    assert settings.batching.max_queue == 7
    assert settings.server.port == 6000
    assert settings.workers.ray_address == "auto"


def test_a_switch_may_be_given_bare_or_with_a_value():
    """Found in review: `--model-control`, as the refusal told users to write, was an argparse error."""
    assert settings_from_args(serve_args("--model-control", "--port", "5")).models.control is True
    assert settings_from_args(serve_args("--model-control", "false")).models.control is False
    assert settings_from_args(serve_args()).models.control is False


def test_cuda_graphs_are_off_unless_asked_for_by_flag_or_environment(monkeypatch):
    assert settings_from_args(serve_args()).workers.cuda_graphs is False
    assert settings_from_args(serve_args("--cuda-graphs", "true")).workers.cuda_graphs is True
    assert settings_from_args(serve_args("--cuda-graphs")).workers.cuda_graphs is True
    monkeypatch.setenv("CONVRAY_WORKERS__CUDA_GRAPHS", "true")
    assert settings_from_args(serve_args()).workers.cuda_graphs is True


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
        (["--transport", "grpc"], "transport"),
        (["--port", "9100"], "--metrics-port must differ from --port"),
        (["--http-port", "50051"], "--http-port 50051 must differ from the other ports"),
        (["--http-port", "0", "--frontends", "2"], "--frontends above 1 needs fixed ports"),
        (["--http-port", "9101", "--frontends", "2"], "the front ends' metrics ports 9100-9101 include --http-port"),
        (["--graph", "jit"], "graph"),
        (["--graph", "frozen", "--amp", "bf16"], "--graph frozen does not combine with --amp bf16"),
        (["--cuda-graphs", "true", "--graph", "compiled"], "--cuda-graphs does not combine with --graph compiled"),
        (["--device", "cuda"], "--device cuda needs --gpus-per-replica above 0"),
        (["--gpus-per-replica", "2"], "gpus_per_replica"),  # a replica uses one GPU; more would sit idle
    ],
)
def test_invalid_values_are_refused_naming_the_field(argv, message):
    with pytest.raises(ValidationError, match=message):
        settings_from_args(serve_args(*argv))


def test_help_text_comes_from_the_field_docstrings():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "At most this many requests share one replica call" in text
    assert "CONVRAY_BATCHING__MAX_BATCH_SIZE" in text


def test_readme_configuration_table_is_current():
    """The README's table is generated by scripts/settings_table.py; regenerate it when a setting changes."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    table = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "settings_table.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert table in (REPO_ROOT / "README.md").read_text()


def test_a_queue_smaller_than_a_batch_is_accepted_but_doubted():
    assert Settings().doubts() == []  # the defaults raise no doubt
    doubts = Settings(batching={"max_batch_size": 8, "max_queue": 4}).doubts()
    assert doubts == [
        "--max-queue 4 is below --max-batch-size 8: batches can never fill, "
        "and requests of more than 4 images are always refused"
    ]


def test_model_control_or_a_token_in_cleartext_beyond_loopback_are_doubted_and_control_with_front_ends_refused():
    assert Settings(models={"control": True}).doubts() == []  # localhost
    open_to_all = Settings(models={"control": True}, server={"host": "0.0.0.0"})
    assert open_to_all.doubts() == [
        "--model-control with --host 0.0.0.0 and no --auth-token-file: anyone who can reach port 50051 can unload "
        "every model"
    ]
    token = Settings(server={"host": "0.0.0.0"}, security={"auth_token_file": "token"})
    assert token.doubts() == [
        "--auth-token-file without --tls-cert/--tls-key on --host 0.0.0.0: clients send the token in cleartext, "
        "readable by anyone on the network path"
    ]
    with pytest.raises(ValidationError, match="--model-control cannot be used with --frontends 2"):
        Settings(models={"control": True}, server={"frontends": 2})


def test_invalid_settings_are_named_by_their_flag_and_environment_variable(capsys):
    """Found in a walkthrough: the error named the model's field (batching.dispatch_when_idle) and linked pydantic."""
    from convray.service.cli import main

    assert main(["serve", "--dispatch-when-idle", "maybe", "--port", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--dispatch-when-idle (CONVRAY_BATCHING__DISPATCH_WHEN_IDLE): Input should be a valid boolean" in err
    assert "got 'maybe'" in err and "--port (CONVRAY_SERVER__PORT)" in err
    assert "errors.pydantic.dev" not in err


def test_help_shows_what_each_value_looks_like():
    from convray.service.cli import build_parser

    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    text = serve.format_help()
    assert "--transport direct|compiled-graph|actor-call" in text and "--dispatch-when-idle [true|false]" in text
    assert "--drain-grace-s S" in text and "``" not in text
