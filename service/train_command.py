"""The ``convray train`` command: flags -> TrainConfig -> one training run that publishes a version."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from convray.service.exit_codes import EXIT_OK, EXIT_USAGE


def cmd_train(args: argparse.Namespace) -> int:
    """Train a CNN and publish it as the next version in the model repository."""
    from convray.workers.train import TrainConfig, train_and_publish

    config = TrainConfig(
        dataset=args.dataset,
        preset=args.preset,
        spec_file=args.spec,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        max_lr=args.lr,
        seed=args.seed,
    )
    on_epoch = None
    if args.metrics_port is not None:  # progress as Prometheus gauges, for the dashboard's training row
        from prometheus_client import CollectorRegistry, start_http_server

        from convray.service.metrics import TrainingMetrics

        progress = TrainingMetrics(CollectorRegistry(), args.model_name)
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=progress.registry)
        on_epoch = progress.observe_epoch
    try:
        train_and_publish(config, Path(args.model_repo), args.model_name, on_epoch=on_epoch)
    except ValueError as exc:
        print(f"convray train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def add_train_commands(commands: Any) -> None:
    """Add ``train`` to the ``convray`` sub-command parsers."""
    train = commands.add_parser("train", help="train and publish a model version", description=cmd_train.__doc__)
    train.add_argument("--dataset", default="digits", choices=["digits"])
    train.add_argument("--preset", default="digits-small", help="named CNN spec (see workers/train.py)")
    train.add_argument("--spec", default=None, help="JSON file with a CNN spec (overrides --preset)")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    train.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--model-repo", default="models")
    train.add_argument("--model-name", default="digits")
    train.add_argument("--metrics-port", type=int, default=None, help="serve progress gauges on /metrics here")
    train.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    train.set_defaults(run=cmd_train)
