"""The ``convray`` command: serve | classify | models | train. Flags -> Settings -> one function call."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from convray.service.config import Settings

# Every `convray serve` flag and the Settings field it sets (group, field).
SERVE_FLAGS: dict[str, tuple[str, str]] = {
    "--host": ("server", "host"),
    "--port": ("server", "port"),
    "--metrics-host": ("server", "metrics_host"),
    "--metrics-port": ("server", "metrics_port"),
    "--max-message-bytes": ("server", "max_message_bytes"),
    "--drain-grace-s": ("server", "drain_grace_s"),
    "--model-repo": ("models", "model_repo"),
    "--default-model": ("models", "default_model"),
    "--max-batch-size": ("batching", "max_batch_size"),
    "--max-batch-delay-ms": ("batching", "max_batch_delay_ms"),
    "--max-queue": ("batching", "max_queue"),
    "--batches-in-flight-per-replica": ("batching", "batches_in_flight_per_replica"),
    "--ray-address": ("workers", "ray_address"),
    "--ray-num-cpus": ("workers", "ray_num_cpus"),
    "--replicas": ("workers", "replicas"),
    "--cpus-per-replica": ("workers", "cpus_per_replica"),
    "--gpus-per-replica": ("workers", "gpus_per_replica"),
    "--device": ("workers", "device"),
    "--amp": ("workers", "amp"),
    "--max-restarts": ("workers", "max_restarts"),
    "--max-image-bytes": ("inputs", "max_image_bytes"),
    "--max-image-pixels": ("inputs", "max_image_pixels"),
    "--default-top-k": ("inputs", "default_top_k"),
    "--decode-threads": ("inputs", "decode_threads"),
    "--tls-cert": ("security", "tls_cert"),
    "--tls-key": ("security", "tls_key"),
    "--tls-client-ca": ("security", "tls_client_ca"),
    "--auth-token-file": ("security", "auth_token_file"),
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    groups = Settings.model_fields
    for flag, (group, field) in SERVE_FLAGS.items():
        info = groups[group].annotation.model_fields[field]  # type: ignore[union-attr] (groups are models)
        default = info.default
        parser.add_argument(
            flag,
            dest=f"{group}.{field}",
            default=None,
            metavar=field.split("_")[-1].upper(),
            help=f"{info.description or ''} [env CONVRAY_{group.upper()}__{field.upper()}; default {default}]",
        )
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag given on the command line laid over it."""
    overrides: dict[str, dict[str, Any]] = {}
    for group, field in SERVE_FLAGS.values():
        value = getattr(args, f"{group}.{field}")
        if value is not None:
            overrides.setdefault(group, {})[field] = value
    if args.no_metrics:
        overrides.setdefault("server", {})["metrics_port"] = None
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM."""
    # Ray starts its processes while gRPC's threads run; they exec at once, so gRPC's fork handlers
    # are not needed (they only log "skipping fork() handlers"). Read by grpc at import, so set first.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from convray.service.server import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"convray serve: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(serve(settings))


def _channel(args: argparse.Namespace) -> Any:
    """A channel to ``args.server`` (TLS when a CA or client certificate is given), or None if unreachable."""
    import grpc

    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
        channel = grpc.secure_channel(args.server, credentials)
    else:
        channel = grpc.insecure_channel(args.server)
    try:
        grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
    except grpc.FutureTimeoutError:
        print(
            f"convray: cannot reach a server at {args.server} within {args.connect_timeout:g} s "
            "(is `convray serve` running? set --server HOST:PORT; TLS servers need --tls-ca)",
            file=sys.stderr,
        )
        return None
    return channel


def _call_metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The bearer token from --token-file as call metadata, if one is given."""
    if not args.token_file:
        return []
    return [("authorization", f"Bearer {Path(args.token_file).read_text(encoding='utf-8').strip()}")]


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify image files and print the top classes of each."""
    import grpc

    from convray.v1 import classifier_pb2 as pb
    from convray.v1 import classifier_pb2_grpc as pb_grpc

    channel = _channel(args)
    if channel is None:
        return EXIT_UNREACHABLE
    stub = pb_grpc.ClassifierStub(channel)
    metadata = _call_metadata(args)
    exit_code = EXIT_OK
    for path in args.images:
        try:
            image = Path(path).read_bytes()
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            exit_code = EXIT_FAILED
            continue
        request = pb.ClassifyRequest(image=image, model=args.model, version=args.version, top_k=args.top_k)
        try:
            reply = stub.Classify(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                exit_code = EXIT_UNREACHABLE if exit_code == EXIT_OK else exit_code
            else:
                exit_code = EXIT_FAILED
            continue
        predictions = [{"label": p.label, "probability": round(p.probability, 6)} for p in reply.predictions]
        if args.json:
            print(
                json.dumps(
                    {
                        "image": path,
                        "model": reply.model,
                        "version": reply.version,
                        "predictions": predictions,
                    }
                )
            )
        else:
            print(f"{path}: {reply.model} v{reply.version} ({reply.timings.total_ms:.1f} ms)")
            for p in predictions:
                print(f"  {p['label']:>12}  {p['probability']:.4f}")
    return exit_code


def cmd_models(args: argparse.Namespace) -> int:
    """List the models the server has and which versions are loaded."""
    import grpc

    from convray.v1 import classifier_pb2 as pb
    from convray.v1 import classifier_pb2_grpc as pb_grpc

    channel = _channel(args)
    if channel is None:
        return EXIT_UNREACHABLE
    try:
        reply = pb_grpc.ClassifierStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=args.timeout, metadata=_call_metadata(args)
        )
    except grpc.RpcError as exc:
        print(f"convray models: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_FAILED
    for model in reply.models:
        versions = ", ".join(f"{v.version}{' (loaded)' if v.loaded else ''}" for v in model.versions)
        marker = "  [default model]" if model.name == reply.default_model else ""
        print(f"{model.name}: versions {versions}; serving v{model.default_version}{marker}")
    return EXIT_OK


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


def build_parser() -> argparse.ArgumentParser:
    """The full ``convray`` argument parser."""
    parser = argparse.ArgumentParser(prog="convray", description="Image classification on Ray, over gRPC.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the gRPC server", description=cmd_serve.__doc__)
    _add_serve_flags(serve)
    serve.set_defaults(run=cmd_serve)

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default="localhost:50051", help="HOST:PORT of a convray server")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
        p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to wait for the server")
        p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (turns TLS on)")
        p.add_argument("--tls-cert", default=None, help="PEM client certificate, for mutual TLS")
        p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
        p.add_argument("--token-file", default=None, help="file with the bearer token the server requires")

    classify = commands.add_parser("classify", help="classify image files", description=cmd_classify.__doc__)
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--model", default="", help="model name (default: the server's default model)")
    classify.add_argument("--version", type=int, default=0, help="model version (default: latest loaded)")
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    client_flags(classify)
    classify.set_defaults(run=cmd_classify)

    models = commands.add_parser("models", help="list served models", description=cmd_models.__doc__)
    client_flags(models)
    models.set_defaults(run=cmd_models)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convray`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "classify" and args.top_k < 0:
        print("convray classify: --top-k must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
