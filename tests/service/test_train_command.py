"""`convray train` / `convray tune` flags: each sets one TrainConfig field, and every field has a flag."""

import dataclasses
import re

import pytest

from convray.service.cli import build_parser
from convray.service.exit_codes import EXIT_USAGE
from convray.service.train_command import TRAIN_FLAGS, _field, config_from_args
from convray.workers.train import TrainConfig


def test_every_train_config_field_has_exactly_one_flag():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flagged = [_field(flag) for flag in TRAIN_FLAGS]
    assert sorted(flagged) == sorted(fields), set(fields) ^ set(flagged)


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
        (["--spec", "no-such-spec.json", "--workers", "0"], "No such file or directory: 'no-such-spec.json'"),
        (["--model-name", "a/b", "--workers", "0"], "invalid model name"),  # before, refused after the training
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
