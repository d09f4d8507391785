"""`convray train` / `convray tune` flags: each sets one TrainConfig field, and every field has a flag."""

import dataclasses
import re
import socket
import subprocess
import sys

import pytest

from convray.service.cli import build_parser
from convray.service.exit_codes import EXIT_FAILED, EXIT_USAGE
from convray.service.train_command import TRAIN_FLAGS, _field, config_from_args
from convray.workers.train_config import TrainConfig


def test_every_train_config_field_has_exactly_one_flag():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flagged = [_field(flag) for flag in TRAIN_FLAGS]
    assert sorted(flagged) == sorted(fields), set(fields) ^ set(flagged)


def test_help_shows_each_flags_default_as_train_config_has_it(capsys):
    """Found in review: `convray train --help` showed no defaults at all."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = TrainConfig()
    for flag, value in [("--epochs", defaults.epochs), ("--lr", defaults.max_lr), ("--preset", defaults.preset)]:
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(value))}\)", shown), flag
    assert "--flip, --no-flip random left-right flips (not for digits) (default: off)" in shown


def test_reading_the_train_settings_does_not_import_torch():
    """So that --help can show their defaults without the seconds torch takes to import."""
    code = "import sys, convray.service.cli, convray.workers.train_config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_given_flags_override_the_defaults_and_the_rest_stay():
    args = build_parser().parse_args(
        ["train", "--workers", "3", "--gpu", "--amp", "bf16", "--lr", "0.05", "--spec", "s.json", "--no-flip"]
    )
    config = config_from_args(args)
    given = (config.workers, config.gpu, config.amp, config.max_lr, config.spec_file)
    assert given == (3, True, "bf16", 0.05, "s.json")
    assert config.flip is False and config.epochs == TrainConfig().epochs and config.resume is False


def test_tune_takes_the_same_flags_and_a_trial_count():
    args = build_parser().parse_args(["tune", "--trials", "4", "--epochs", "5", "--model-name", "x"])
    assert args.trials == 4 and config_from_args(args).epochs == 5 and args.model_name == "x"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0", "--schedule", "cosine"], "epochs must be >= 1, got 0"),  # published an untrained model
        (["--threads", "0"], "threads must be >= 1"),
        (["--label-smoothing", "1.5"], r"label smoothing must be in \[0, 1\)"),
        (["--max-shift-px", "-1"], "max shift must be >= 0 pixels"),
        (["--momentum", "1.2"], r"momentum must be in \[0, 1\), got 1.2"),  # one-cycle would run it past 1 and diverge
        (["--lr", "-0.1", "--batch-size", "0"], "batch size must be >= 1, got 0; learning rate must be > 0"),
        (["--resume", "--workers", "0"], "--resume continues a Ray Train run's checkpoints"),
        (["--spec", "no-such-spec.json", "--workers", "0"], "--spec no-such-spec.json: cannot read it: No such file"),
        # Found in review: these failed inside each Ray Train worker, three times, or after the whole run.
        (["--weight-decay", "-0.1"], "weight decay must be >= 0 and finite, got -0.1"),
        (["--storage-path", "s3://bucket/runs"], "--storage-path must be a local or mounted directory"),
        (["--spec", ".", "--workers", "0"], "--spec .: cannot read it: Is a directory"),
        (["--dataset", "npz:.", "--workers", "0"], ".: cannot read it"),
        (["--dataset", "folder:no-such-folder"], "no-such-folder: no such folder"),
        (["--model-name", "a/b", "--workers", "0"], "invalid model name"),  # before, refused after the training
        # Found in review: Ray refused the first after starting the run, with a traceback; the others were unchecked.
        (["--cpus-per-worker", "-1"], "CPUs per worker must be > 0 and finite, got -1"),
        (["--cpus-per-worker", "nan", "--lr", "inf"], "learning rate must be > 0 and finite, got inf; .* got nan"),
        (["--max-failures", "-1"], "max failures must be >= 0, got -1"),  # Ray's -1: retry for ever
        (["--held-out-fraction", "1", "--workers", "0"], r"held-out fraction must be in \(0, 1\), got 1"),
    ],
)
def test_options_no_run_can_use_are_a_usage_error_before_any_training(flags, message, tmp_path, capsys):
    args = build_parser().parse_args(["train", *flags, "--model-repo", str(tmp_path)])
    assert args.run(args) == EXIT_USAGE
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing published


def test_a_plain_resume_takes_the_runs_own_settings_and_given_flags_stay(tmp_path):
    from tests.workers.test_ray_train import RUN, checkpointed_run

    checkpointed_run(tmp_path, RUN, TrainConfig(epochs=30, seed=3, workers=4))
    args = build_parser().parse_args(["train", "--resume", "--storage-path", str(tmp_path), "--seed", "9"])
    config = config_from_args(args)
    assert (config.run_name, config.epochs, config.workers, config.seed) == (RUN, 30, 4, 9)  # the seed was given


def test_a_run_that_diverges_publishes_nothing_and_fails(tmp_path, capsys):
    """Found in review: NaN weights were published, and every server refused the version and retried it."""
    flags = ["--workers", "0", "--epochs", "1", "--lr", "1e6", "--schedule", "constant", "--model-repo", str(tmp_path)]
    args = build_parser().parse_args(["train", *flags])
    assert args.run(args) == EXIT_FAILED
    assert re.search(
        r"digits: not published: tensors with NaN or infinite values .* lower learning rate", capsys.readouterr().err
    )
    assert not (tmp_path / "digits").exists() or not any((tmp_path / "digits").iterdir())


def test_a_model_repository_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    """Found in review: a --model-repo that is a file failed only at publish, after the whole run."""
    not_a_folder = tmp_path / "repo"
    not_a_folder.write_text("a file")
    args = build_parser().parse_args(["train", "--workers", "0", "--model-repo", str(not_a_folder)])
    assert args.run(args) == EXIT_USAGE
    assert f"model repository {not_a_folder}: cannot publish 'digits' there" in capsys.readouterr().err


def test_a_metrics_port_out_of_range_or_taken_is_a_usage_error_in_this_process(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--metrics-port", "70000"])
    assert exit_info.value.code == EXIT_USAGE and "a port is 1-65535, got 70000" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(
            ["train", "--workers", "0", "--model-repo", str(tmp_path), "--metrics-port", str(port)]
        )
        assert args.run(args) == EXIT_USAGE
    assert f"--metrics-port: cannot serve 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_search_whose_metrics_port_is_taken_is_a_usage_error_before_it_starts(tmp_path, capsys):
    """``convray tune`` serves its gauges from its own process (Tune's driver), so it binds the port at once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(["tune", "--model-repo", str(tmp_path), "--metrics-port", str(port)])
        assert args.run(args) == EXIT_USAGE
    assert f"convray tune: --metrics-port: cannot serve 127.0.0.1:{port}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_on_a_ray_train_worker_a_taken_metrics_port_leaves_the_training_going_without_gauges(capsys):
    """Found in review: the worker's bind error failed the worker group, three times, and so the whole run."""
    from convray.service.train_command import EpochGauges
    from convray.workers.progress import EpochProgress

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gauges = EpochGauges("digits", taken.getsockname()[1], "127.0.0.1")
        progress = EpochProgress(epoch=1, epochs=2, loss=0.5, accuracy=0.9, images_per_second=100.0)
        gauges(progress)
        gauges(progress)  # and keeps quiet afterwards
    out = capsys.readouterr().out
    assert out.count("no progress gauges: cannot serve") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_training_in_this_process_without_a_gpu_is_refused(tmp_path, capsys):
    """Found in review: it trained on the CPU and recorded gpu: true in model.json."""
    args = build_parser().parse_args(["train", "--workers", "0", "--gpu", "--model-repo", str(tmp_path)])
    assert args.run(args) == EXIT_USAGE
    assert "--gpu with --workers 0 trains in this process, which sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trials", "0"], "--trials must be >= 1, got 0"),  # was an uncaught RuntimeError
        (["--workers", "0"], "--workers 0: each trial is a Ray Train run"),  # every trial failed
        (["--resume"], "--resume continues a `convray train` run"),
        (["--run-name", "mine"], "--run-name: each trial is named by Ray Tune"),
    ],
)
def test_tune_refuses_what_a_search_cannot_honour(flags, message, tmp_path, capsys):
    args = build_parser().parse_args(["tune", *flags, "--model-repo", str(tmp_path)])
    assert args.run(args) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_tune_keeps_the_optimiser_knobs_given_as_flags_out_of_the_search():
    """Found in review: --optimizer, --lr, --weight-decay and --label-smoothing were overwritten by each draw."""
    from convray.workers.tune import config_for, search_space

    space = search_space(fixed=["optimizer", "max_lr"])
    assert "optimizer" not in space and "max_lr" not in space and "weight_decay" in space
    drawn = {"weight_decay": 1e-4, "label_smoothing": 0.05, "head": "gap"}
    config = config_for(TrainConfig(optimizer="adamw", max_lr=0.02), drawn)
    assert (config.optimizer, config.max_lr, config.weight_decay) == ("adamw", 0.02, 1e-4)
