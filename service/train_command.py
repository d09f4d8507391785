"""``convray train`` and ``convray tune``: flags -> TrainConfig -> one run (or search) that publishes a version."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from convray.service.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from convray.workers.progress import EpochProgress

# Every `convray train` / `convray tune` flag and its argparse options; each sets the TrainConfig field of
# the same name (dashes for underscores), or the one named by "dest". Defaults live in TrainConfig only.
TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "--dataset": {"help": "digits | folder:PATH (PATH/<class>/*.png|jpg, read with Ray Data) | npz:PATH"},
    "--held-out-fraction": {"type": float, "help": "stratified validation split (default 0.2; digits: 360 images)"},
    "--image-size": {"type": int, "help": "folders: resize images to this square size"},
    "--colour-mode": {"choices": ["L", "RGB"], "help": "folders: convert images to grey (L) or RGB"},
    "--max-shift-px": {"type": int, "help": "random-shift augmentation, pixels each way (0: off)"},
    "--flip": {"action": argparse.BooleanOptionalAction, "help": "random left-right flips (not for digits)"},
    "--preset": {"help": "named CNN spec (workers/spec.py PRESETS)"},
    "--spec": {"dest": "spec_file", "help": "JSON file with a CNN spec (overrides --preset)"},
    "--epochs": {"type": int},
    "--batch-size": {"type": int, "help": "images per optimiser step, over all workers"},
    "--optimizer": {"choices": ["sgd", "adamw"]},
    "--schedule": {"choices": ["one_cycle", "cosine", "constant"], "help": "learning-rate schedule, per step"},
    "--lr": {"dest": "max_lr", "type": float, "help": "peak (one_cycle) or initial learning rate"},
    "--momentum": {"type": float, "help": "SGD momentum (AdamW: beta1); one_cycle moves it 0.05 either way"},
    "--weight-decay": {"type": float},
    "--label-smoothing": {"type": float},
    "--seed": {"type": int},
    "--threads": {"type": int, "help": "torch threads of the single-process loop (--workers 0)"},
    "--workers": {"type": int, "help": "Ray Train workers; 0 trains in this process without Ray"},
    "--cpus-per-worker": {"type": float, "help": "Ray CPUs per worker, also its torch thread count"},
    "--gpu": {"action": argparse.BooleanOptionalAction, "help": "one GPU per worker"},
    "--amp": {"choices": ["none", "bf16", "fp16"], "help": "mixed precision on GPU (ignored on CPU)"},
    "--ray-address": {"help": "Ray cluster to join ('auto' inside a RayJob); unset starts a local Ray"},
    "--storage-path": {"help": "where runs keep their per-epoch checkpoints (shared storage on a cluster)"},
    "--run-name": {"help": "checkpoint directory name under --storage-path (default: MODEL-NAME-UTC-TIME)"},
    "--resume": {
        "action": "store_true",
        "help": "continue the latest run of --model-name from its checkpoint, with the settings it was started with "
        "(flags left out take the run's values, not the defaults shown here)",
    },
    "--max-failures": {"type": int, "help": "worker-group restarts from the last checkpoint before failing"},
    "--fail-at-epoch": {"type": int, "help": argparse.SUPPRESS},  # tests: failure injection
}


def config_from_args(args: argparse.Namespace) -> Any:
    """A TrainConfig with every flag given on the command line laid over the defaults."""
    from convray.workers.train_config import TrainConfig

    given = {field: getattr(args, field) for field in map(_field, TRAIN_FLAGS)}
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    if config.resume and config.workers > 0 and getattr(args, "model_name", None):
        from convray.workers.ray_train import continue_run

        config = continue_run(config, args.model_name, {k for k, v in given.items() if v is not None})
    return config


def _field(flag: str) -> str:
    return str(TRAIN_FLAGS[flag].get("dest", flag[2:].replace("-", "_")))


class EpochGauges:
    """``--metrics-port``: progress as Prometheus gauges, served from the process that reports epochs.

    Picklable until its first call, so a Ray Train run can take it to its rank-0 worker, where it starts
    serving after the first epoch (and again after a worker-group restart).
    """

    def __init__(self, model_name: str, port: int, host: str) -> None:
        self._model_name, self._port, self._host = model_name, port, host
        self._metrics: Any = None
        self._unavailable = False  # the port could not be bound on a worker: train on without gauges

    def start(self) -> None:
        """Serve /metrics now (``--workers 0``: before the first epoch).

        Raises:
            OSError: the port cannot be bound (taken, or not this machine's address).
        """
        from prometheus_client import CollectorRegistry, start_http_server

        from convray.service.metrics import TrainingMetrics

        metrics = TrainingMetrics(CollectorRegistry(), self._model_name)
        start_http_server(self._port, addr=self._host, registry=metrics.registry)
        self._metrics = metrics

    def __call__(self, progress: EpochProgress) -> None:
        """Record one finished epoch."""
        if self._unavailable:
            return
        if self._metrics is None:
            try:
                self.start()
            except OSError as exc:  # gauges are a side channel: they must not stop the training
                self._unavailable = True
                print(f"convray train: no progress gauges: cannot serve {self._host}:{self._port}: {exc}", flush=True)
                return
        self._metrics.observe_epoch(progress)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {port}")
    return port


def cmd_train(args: argparse.Namespace) -> int:
    """Train a CNN (in this process or on Ray Train workers) and publish it as the next model version."""
    from convray.workers.data import check_source
    from convray.workers.repository import UnservableWeights, validate_model_name
    from convray.workers.train_config import TrainingFailed

    try:
        config = config_from_args(args)
        validate_model_name(args.model_name)  # now, not after the whole training
        check_source(config.dataset)  # and before torch is imported (2-3 s)
        from convray.workers.train import train_and_publish

        on_epoch = None
        if args.metrics_port is not None:
            on_epoch = EpochGauges(args.model_name, args.metrics_port, args.metrics_host)
            if config.workers == 0:
                try:
                    on_epoch.start()
                except OSError as exc:
                    raise _port_refused(args, exc) from None
        train_and_publish(config, Path(args.model_repo), args.model_name, on_epoch=on_epoch)
    except (TrainingFailed, UnservableWeights) as exc:  # it ran, and ended with nothing to publish
        print(f"convray train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError) as exc:  # bad flags, or a --spec / dataset file that is not there
        print(f"convray train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    """Search spec and optimiser choices with Ray Tune (each trial a Ray Train run); publish the best."""
    from convray.workers.data import check_source
    from convray.workers.repository import UnservableWeights, validate_model_name
    from convray.workers.train_config import SEARCHED_KNOBS, TrainingFailed

    try:
        validate_model_name(args.model_name)
        refused = [
            message
            for bad, message in (
                (args.trials < 1, f"--trials must be >= 1, got {args.trials}"),
                (args.workers == 0, "--workers 0: each trial is a Ray Train run, so --workers >= 1"),
                (args.resume, "--resume continues a `convray train` run; a search starts its own trials"),
                (args.run_name is not None, "--run-name: each trial is named by Ray Tune (trial-<id>)"),
            )
            if bad
        ]
        if refused:
            raise ValueError("; ".join(refused))
        fixed = [knob for knob in SEARCHED_KNOBS if getattr(args, knob) is not None]  # the user's stay as given
        config = config_from_args(args)
        check_source(config.dataset)  # before torch and Ray Tune are imported
        progress = None if args.metrics_port is None else _serve_search_metrics(args, config.epochs)
        from convray.workers.tune import tune_and_publish

        tune_and_publish(config, args.trials, Path(args.model_repo), args.model_name, fixed=fixed, progress=progress)
    except (TrainingFailed, UnservableWeights) as exc:
        print(f"convray tune: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError) as exc:
        print(f"convray tune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _serve_search_metrics(args: argparse.Namespace, epochs: int) -> Any:
    """``convray tune --metrics-port``: the search's gauges, served from this process (its Tune driver) from now.

    Raises:
        ValueError: the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    from convray.service.metrics import SearchMetrics

    metrics = SearchMetrics(CollectorRegistry(), args.model_name, args.trials, epochs)
    try:
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    except OSError as exc:
        raise _port_refused(args, exc) from None
    return metrics


def _port_refused(args: argparse.Namespace, exc: OSError) -> ValueError:
    """The usage error for a ``--metrics-port`` this process cannot bind (taken, or not this machine's address)."""
    return ValueError(f"--metrics-port: cannot serve {args.metrics_host}:{args.metrics_port}: {exc}")


def _add_train_flags(
    parser: argparse.ArgumentParser,
    hidden: tuple[str, ...] = (),
    searched: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """Every TRAIN_FLAGS flag; those in ``hidden`` are parsed (to be refused, or unused) but not in --help.

    ``searched``: TrainConfig fields a search draws unless their flag is given (their help says so instead of
    a default); ``helps``: help texts that replace TRAIN_FLAGS' own for this command.
    """
    from convray.workers.train_config import TrainConfig  # free of torch: cheap enough for every `convray` start

    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    for flag, options in TRAIN_FLAGS.items():
        options = {**options, "help": (helps or {}).get(flag, options.get("help", ""))}
        if flag in hidden:
            shown = {"help": argparse.SUPPRESS}
        elif _field(flag) in searched:
            shown = {"help": f"{options['help']} (searched unless given)".lstrip()}
        else:
            shown = _with_default(options, defaults[_field(flag)])
        # Unset flags stay None, so that TrainConfig's defaults apply and --resume can tell what was given.
        parser.add_argument(flag, **{"dest": _field(flag), "default": None, **options, **shown})
    parser.add_argument("--model-repo", default="models", help="repository to publish into (default: models)")
    parser.add_argument("--model-name", default="digits", help="model to publish the next version of (default: digits)")


def _with_default(options: dict[str, Any], default: Any) -> dict[str, Any]:
    """``options``' help with TrainConfig's default added, unless the help already says it or there is none."""
    text = options.get("help", "")
    if text == argparse.SUPPRESS or "default" in text or default is None or options.get("action") == "store_true":
        return {}
    if isinstance(default, bool):
        default = "on" if default else "off"
    return {"help": f"{text} (default: {default})".lstrip()}


def add_train_commands(commands: Any) -> None:
    """Add ``train`` and ``tune`` to the ``convray`` sub-command parsers."""
    from convray.workers.train_config import SEARCHED_KNOBS  # free of torch, like TrainConfig

    train = commands.add_parser("train", help="train and publish a model version", description=cmd_train.__doc__)
    _add_train_flags(train)
    train.add_argument("--metrics-port", type=_port, default=None, help="serve progress gauges on /metrics here")
    train.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: 127.0.0.1)")
    train.set_defaults(run=cmd_train)

    tune = commands.add_parser("tune", help="search hyperparameters, publish the best", description=cmd_tune.__doc__)
    _add_train_flags(
        tune,
        # A search names and starts its own trials (--resume, --run-name are refused), and runs them on Ray Train
        # workers, whose threads --cpus-per-worker sets (--threads, for a single-process run, goes unused).
        hidden=("--resume", "--run-name", "--threads"),
        searched=SEARCHED_KNOBS,
        helps={"--workers": "Ray Train workers of each trial (at least 1)"},
    )
    tune.add_argument("--trials", type=int, default=8, help="configurations to try (default: 8)")
    tune.add_argument(
        "--metrics-port", type=_port, default=None, help="serve the search's progress gauges on /metrics here"
    )
    tune.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: 127.0.0.1)")
    tune.set_defaults(run=cmd_tune)
