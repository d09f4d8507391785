"""The ``convray`` command: serve | classify | models | explain | kernels | train. Flags -> Settings -> one call."""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import sys
import typing
from typing import Any, Literal

from pydantic import ValidationError

from convray.service.client_commands import add_client_commands
from convray.service.config import Settings
from convray.service.exit_codes import EXIT_FAILED, EXIT_USAGE
from convray.service.train_command import add_train_commands

# Every `convray serve` flag and the Settings field it sets (group, field).
SERVE_FLAGS: dict[str, tuple[str, str]] = {
    "--host": ("server", "host"),
    "--port": ("server", "port"),
    "--health-port": ("server", "health_port"),
    "--http-port": ("server", "http_port"),
    "--metrics-host": ("server", "metrics_host"),
    "--metrics-port": ("server", "metrics_port"),
    "--max-message-bytes": ("server", "max_message_bytes"),
    "--drain-grace-s": ("server", "drain_grace_s"),
    "--max-connection-age-s": ("server", "max_connection_age_s"),
    "--keepalive-time-s": ("server", "keepalive_time_s"),
    "--keepalive-timeout-s": ("server", "keepalive_timeout_s"),
    "--min-client-ping-interval-s": ("server", "min_client_ping_interval_s"),
    "--frontends": ("server", "frontends"),
    "--event-loop": ("server", "event_loop"),
    "--model-repo": ("models", "model_repo"),
    "--default-model": ("models", "default_model"),
    "--poll-interval-s": ("models", "poll_interval_s"),
    "--model-control": ("models", "control"),
    "--max-batch-size": ("batching", "max_batch_size"),
    "--max-batch-delay-ms": ("batching", "max_batch_delay_ms"),
    "--max-queue": ("batching", "max_queue"),
    "--dispatch-when-idle": ("batching", "dispatch_when_idle"),
    "--batches-in-flight-per-replica": ("batching", "batches_in_flight_per_replica"),
    "--adaptive-in-flight": ("batching", "adaptive_in_flight"),
    "--ray-address": ("workers", "ray_address"),
    "--ray-connect-timeout-s": ("workers", "ray_connect_timeout_s"),
    "--ray-check-interval-s": ("workers", "ray_check_interval_s"),
    "--ray-lost-exit-s": ("workers", "ray_lost_exit_s"),
    "--ray-num-cpus": ("workers", "ray_num_cpus"),
    "--replicas": ("workers", "replicas"),
    "--cpus-per-replica": ("workers", "cpus_per_replica"),
    "--gpus-per-replica": ("workers", "gpus_per_replica"),
    "--device": ("workers", "device"),
    "--amp": ("workers", "amp"),
    "--graph": ("workers", "graph"),
    "--cuda-graphs": ("workers", "cuda_graphs"),
    "--max-restarts": ("workers", "max_restarts"),
    "--replica-start-timeout-s": ("workers", "replica_start_timeout_s"),
    "--batch-timeout-s": ("workers", "batch_timeout_s"),
    "--transport": ("workers", "transport"),
    "--max-image-bytes": ("inputs", "max_image_bytes"),
    "--max-image-pixels": ("inputs", "max_image_pixels"),
    "--max-request-pixels": ("inputs", "max_request_pixels"),
    "--default-top-k": ("inputs", "default_top_k"),
    "--decode-threads": ("inputs", "decode_threads"),
    "--tls-cert": ("security", "tls_cert"),
    "--tls-key": ("security", "tls_key"),
    "--tls-client-ca": ("security", "tls_client_ca"),
    "--auth-token-file": ("security", "auth_token_file"),
    "--explain-max-blocks": ("explain", "max_blocks"),
    "--explain-max-channels": ("explain", "max_channels"),
    "--explain-max-top-k": ("explain", "max_top_k"),
    "--explain-max-in-flight": ("explain", "max_in_flight"),
}


def env_var(group: str, field: str) -> str:
    """The environment variable that sets Settings field ``group.field``, e.g. CONVRAY_BATCHING__MAX_QUEUE."""
    return f"CONVRAY_{group.upper()}__{field.upper()}"


def _metavar(field: str, info: Any) -> str:
    """What a flag's value looks like in --help: its choices, true|false, N, S (seconds), MS, or a noun."""
    for kind in (info.annotation, *typing.get_args(info.annotation)):  # a Literal, or an optional one
        if typing.get_origin(kind) is Literal:
            return "|".join(map(str, typing.get_args(kind)))
    kinds = {arg for arg in typing.get_args(info.annotation) if arg is not type(None)} or {info.annotation}
    if bool in kinds:
        return "true|false"
    if field.endswith("_s"):
        return "S"
    if field.endswith("_ms"):
        return "MS"
    if int in kinds or float in kinds:
        return "N"
    return field.split("_")[-1].upper()


def _help(info: Any, group: str, field: str) -> str:
    """A setting's docstring for --help: field names it mentions as their flags, code marks dropped."""
    flags = {f: flag for flag, (_, f) in SERVE_FLAGS.items()}
    text = re.sub(r"``(\w+)``", lambda m: flags.get(m.group(1), m.group(1)), info.description or "")
    default = "unset" if info.default is None else info.default
    return f"{text.replace('``', '')} [env {env_var(group, field)}; default {default}]"


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    groups = Settings.model_fields
    for flag, (group, field) in SERVE_FLAGS.items():
        info = groups[group].annotation.model_fields[field]  # type: ignore[union-attr] (groups are models)
        # A switch may be given bare (`--model-control`) as well as with a value (`--model-control false`).
        bare = {"nargs": "?", "const": "true"} if info.annotation is bool else {}
        parser.add_argument(
            flag,
            dest=f"{group}.{field}",
            default=None,
            metavar=_metavar(field, info),
            help=_help(info, group, field),
            **bare,
        )
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")


def settings_problems(error: ValidationError) -> list[str]:
    """Each problem of invalid settings, named by its flag and environment variable, not by the model's field."""
    by_field = {fields: flag for flag, fields in SERVE_FLAGS.items()}
    problems = []
    for item in error.errors(include_url=False):
        where = tuple(str(part) for part in item["loc"][:2])
        if where in by_field:
            name = f"{by_field[where]} ({env_var(*where)})"
        else:  # a check across several settings
            name = ".".join(where) or "settings"
        given = (
            f", got {item['input']!r}" if item["type"] != "value_error" and not isinstance(item["input"], dict) else ""
        )
        problems.append(f"{name}: {item['msg'].removeprefix('Value error, ')}{given}")
    return problems


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
    from convray.service import event_loop
    from convray.service.server import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print("convray serve: invalid settings:\n  " + "\n  ".join(settings_problems(exc)), file=sys.stderr)
        return EXIT_USAGE
    try:
        event_loop.resolve(settings.server.event_loop)  # refused here, before any front end or Ray starts
    except RuntimeError as exc:
        print(f"convray serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.server.frontends > 1:
        from convray.service.frontends import run_frontends

        return run_frontends(settings, args.log_level)
    return event_loop.run(serve(settings), settings.server.event_loop)


def build_parser() -> argparse.ArgumentParser:
    """The full ``convray`` argument parser."""
    parser = argparse.ArgumentParser(prog="convray", description="Image classification on Ray, over gRPC.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the gRPC server", description=cmd_serve.__doc__)
    _add_serve_flags(serve)
    serve.set_defaults(run=cmd_serve)

    add_client_commands(commands)
    add_train_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convray`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("classify", "explain") and args.top_k is not None and args.top_k < 0:
        print(f"convray {args.command}: --top-k must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "kernels" and args.stride < 1:
        print("convray kernels: --stride must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket than our output
        # The reader of our output went away (`convray classify ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return EXIT_FAILED


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here (Windows), or stdout replaced or closed
        return False


if __name__ == "__main__":
    sys.exit(main())
