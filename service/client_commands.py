"""The ``convray`` client commands: classify, models, explain, bench, and the local kernels tool."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import sys
from collections import deque
from pathlib import Path
from typing import Any

from convray.service.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}  # what `convray bench` can generate images as

# `convray kernels --kernel` choices; the kernels themselves are in workers/kernels.py (imported lazily).
KERNEL_NAMES = ("sobel-x", "sobel-y", "laplacian", "box-blur", "gaussian", "sharpen")


# gRPC retries only calls whose request fits its buffer (256 KiB by default); images may be larger.
RETRY_BUFFER_BYTES = 16 * 1024 * 1024


def retry_options(retries: int) -> list[tuple[str, Any]]:
    """Channel options that retry a refused call ``retries`` times (gRPC allows at most 4).

    Every call these commands make is idempotent, so a call refused as overloaded (RESOURCE_EXHAUSTED) or
    unavailable (a replica restarting, a server draining) is sent again: after the delay the server
    advises (``grpc-retry-pushback-ms``), else after a backoff from 0.1 s doubling to 2 s (with jitter).
    """
    if retries == 0:
        return [("grpc.enable_retries", 0)]
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
    }
    service_config = {"methodConfig": [{"name": [{}], "retryPolicy": policy}]}  # {}: every method
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
    ]


def client_problem(args: argparse.Namespace) -> str | None:
    """Why the client flags cannot work, found before anything is sent (a usage error); None when they can.

    Left to gRPC and protobuf, these were a crash (a certificate without its key aborted the process), a
    traceback (an unreadable file, a version past int64) or a silently plaintext connection (a key alone).
    Flags that work but expose the token (sent in cleartext beyond this machine) get a warning on stderr.
    """
    from convray.service.credentials import cleartext_token_warning

    servers = [s.strip() for s in args.server.split(",") if s.strip()]
    if warning := cleartext_token_warning(servers, args.token_file, bool(args.tls_ca or args.tls_cert)):
        print(f"convray: warning: {warning}", file=sys.stderr)
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together: a client certificate and its private key"
    for flag in ("tls_ca", "tls_cert", "tls_key", "token_file"):
        path = getattr(args, flag)
        if not path:
            continue
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            return f"--{flag.replace('_', '-')} {path}: cannot read: {exc.strerror}"
        if flag == "token_file" and (not content.strip() or len(content.split()) != 1):
            return f"--token-file {path}: must hold one token, with no spaces or line breaks inside"
    for flag in ("timeout", "connect_timeout"):  # NaN compares false both ways: `<= 0` let it through
        seconds = getattr(args, flag, 1.0)
        if not (seconds > 0 and math.isfinite(seconds)):
            return f"--{flag.replace('_', '-')} must be a number of seconds > 0, got {seconds:g}"
    if not 0 <= getattr(args, "version", 0) < 2**63:
        return f"--version must be 0 (latest) or a positive version number, got {args.version}"
    if (getattr(args, "top_k", 0) or 0) >= 2**32:
        return f"--top-k is too large: {args.top_k}"
    return None


def _channel(args: argparse.Namespace) -> Any:
    """A channel to ``args.server`` (TLS when a CA or client certificate is given), or None if unreachable."""
    import grpc

    from convray.service.credentials import channel_credentials

    options = retry_options(args.retries)
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if credentials is not None:
        channel = grpc.secure_channel(args.server, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.server, options=options)
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
    from convray.service.credentials import bearer_metadata

    return list(bearer_metadata(args.token_file))


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify image files and print the top classes of each, in the order given."""
    from convray.v1 import classifier_pb2 as pb
    from convray.v1 import classifier_pb2_grpc as pb_grpc

    problem = client_problem(args)
    if problem is None and args.in_flight < 1:
        problem = f"--in-flight must be >= 1, got {args.in_flight}"
    if problem:
        print(f"convray classify: {problem}", file=sys.stderr)
        return EXIT_USAGE
    channel = _channel(args)
    if channel is None:
        return EXIT_UNREACHABLE
    stub = pb_grpc.ClassifierStub(channel)
    metadata = _call_metadata(args)
    exit_code = EXIT_OK

    def send(path: str) -> Any:
        """The call's future, or the OSError reading the file raised."""
        try:
            image = Path(path).read_bytes()
        except OSError as exc:
            return exc
        request = pb.ClassifyRequest(image=image, model=args.model, version=args.version, top_k=args.top_k or 0)
        return stub.Classify.future(request, timeout=args.timeout, metadata=metadata)

    # Up to --in-flight calls at once, so the server can batch them; answers are printed in the files' order.
    pending: deque[tuple[str, Any]] = deque()
    for path in args.images:
        if len(pending) == args.in_flight:
            exit_code = _print_classified(*pending.popleft(), args.json, exit_code, args.top_k)
        pending.append((path, send(path)))
    while pending:
        exit_code = _print_classified(*pending.popleft(), args.json, exit_code, args.top_k)
    return exit_code


DEFAULT_PRINTED = 3
"""Classes `classify` prints per image without --top-k. It asks for the server's default (top_k 0, which the
server caps at the model's class count) and prints that many of them: asking for 3 failed on a 2-class model."""


def _print_classified(path: str, outcome: Any, as_json: bool, exit_code: int, top_k: int | None = None) -> int:
    """Print one file's answer (or why it has none); the exit code with this file counted."""
    import grpc

    if isinstance(outcome, OSError):
        print(f"{path}: cannot read: {outcome.strerror}", file=sys.stderr)
        if as_json:
            print(json.dumps({"image": path, "error": {"code": "UNREADABLE_FILE", "message": outcome.strerror}}))
        return EXIT_FAILED
    try:
        reply = outcome.result()
    except grpc.RpcError as exc:
        print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if as_json:  # a line per file given, so a script can pair its lines with its inputs
            print(json.dumps({"image": path, "error": {"code": exc.code().name, "message": exc.details()}}))
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return EXIT_UNREACHABLE if exit_code == EXIT_OK else exit_code
        return EXIT_FAILED
    shown = reply.predictions if top_k else reply.predictions[:DEFAULT_PRINTED]
    predictions = [{"label": p.label, "probability": round(p.probability, 6)} for p in shown]
    if as_json:
        print(json.dumps({"image": path, "model": reply.model, "version": reply.version, "predictions": predictions}))
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

    problem = client_problem(args)
    if problem:
        print(f"convray models: {problem}", file=sys.stderr)
        return EXIT_USAGE
    channel = _channel(args)
    if channel is None:
        return EXIT_UNREACHABLE
    try:
        reply = pb_grpc.ClassifierStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=args.timeout, metadata=_call_metadata(args)
        )
    except grpc.RpcError as exc:
        print(f"convray models: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED
    for model in reply.models:
        versions = ", ".join(f"{v.version}{' (loaded)' if v.loaded else ''}" for v in model.versions)
        marker = "  [default model]" if model.name == reply.default_model else ""
        # default_version 0: none of its versions is loaded (unloaded, or the server still starting)
        serving = f"serving v{model.default_version}" if model.default_version else "not loaded"
        print(f"{model.name}: versions {versions}; {serving}{marker}")
    return EXIT_OK


def _file_label(label: str) -> str:
    """A class label made safe for a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "_"


def cmd_explain(args: argparse.Namespace) -> int:
    """Write an image's feature-map grids and class activation maps as PNGs, and say what was written."""
    import grpc

    from convray.v1 import classifier_pb2 as pb
    from convray.v1 import classifier_pb2_grpc as pb_grpc

    out = Path(args.out)
    problem = client_problem(args)
    if problem:
        print(f"convray explain: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        image = Path(args.image).read_bytes()
    except OSError as exc:
        print(f"{args.image}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:  # before the call: a reply with nowhere to go is work thrown away
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"convray explain: --out {out}: cannot write there: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    channel = _channel(args)
    if channel is None:
        return EXIT_UNREACHABLE
    methods = {"auto": pb.CAM_METHOD_AUTO, "cam": pb.CAM_METHOD_CAM, "grad-cam": pb.CAM_METHOD_GRAD_CAM}
    request = pb.ExplainRequest(
        image=image,
        model=args.model,
        version=args.version,
        blocks=args.blocks or [],
        top_k=args.top_k or 0,  # 0: the server's default, capped at the model's classes and its Explain limit
        method=methods[args.method],
    )
    try:
        reply = pb_grpc.ClassifierStub(channel).Explain(request, timeout=args.timeout, metadata=_call_metadata(args))
    except grpc.RpcError as exc:
        print(f"{args.image}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED
    # Class activation maps are named by rank: an earlier run's cam-3 beside this run's cam-1 would pass for
    # this image's third class. Removed once there is a reply to replace them (a failed call keeps them).
    for stale in out.glob("cam-*.png"):
        if stale.is_file():
            stale.unlink()
    method = {pb.CAM_METHOD_CAM: "CAM", pb.CAM_METHOD_GRAD_CAM: "Grad-CAM"}.get(reply.method, "?")
    print(f"{args.image}: {reply.model} v{reply.version} ({reply.total_ms:.1f} ms)")
    for m in reply.feature_maps:
        path = out / f"{_file_label(m.block)}.png"  # the server names it: "../x" must not leave --out
        path.write_bytes(m.png)
        shape = "x".join(map(str, m.shape))
        channels = m.shape[0] if m.shape else m.channels_shown
        shown = f"{m.channels_shown} of {channels}" if m.channels_shown < channels else f"{m.channels_shown}"
        print(f"wrote {path}  feature maps of {m.block} ({shape}), {shown} channels in {m.grid_rows}x{m.grid_columns}")
    for rank, cam in enumerate(reply.class_activation_maps, start=1):
        p = cam.prediction
        path = out / f"cam-{rank}-{_file_label(p.label)}.png"
        path.write_bytes(cam.png)
        print(f"wrote {path}  {method} of class {p.label!r} (p={p.probability:.4f}) over {reply.cam_block}")
    return EXIT_OK


def cmd_kernels(args: argparse.Namespace) -> int:
    """Apply a classic fixed kernel to an image with convray's conv block, locally, and write the result."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    from pydantic import ValidationError

    from convray.service.codecs import GREY_MODES, as_colour_mode
    from convray.service.render import response_image
    from convray.workers.kernels import KERNELS, apply_kernel

    padding: str | int = args.padding
    if padding not in ("same", "valid"):
        try:
            padding = int(padding)
        except ValueError:
            print(f"convray kernels: --padding must be same, valid or a number, got {padding!r}", file=sys.stderr)
            return EXIT_USAGE
    try:
        with Image.open(args.image) as image:  # made grey or RGB as the server makes a model's input
            pixels = np.asarray(as_colour_mode(image, "L" if image.mode in GREY_MODES else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        print(f"{args.image}: cannot read as an image: {exc}", file=sys.stderr)
        return EXIT_FAILED
    pixels = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]  # (C, H, W)
    try:
        response = apply_kernel(pixels, args.kernel, padding, args.stride)
    except ValidationError as exc:  # a value no conv block takes: say which flag, in a line, without pydantic's links
        last = {str(error["loc"][0]): error["msg"] for error in exc.errors(include_url=False)}  # a union's last
        print("convray kernels: " + "; ".join(f"--{flag}: {msg}" for flag, msg in last.items()), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"convray kernels: {exc}", file=sys.stderr)
        return EXIT_USAGE
    signed = abs(sum(map(sum, KERNELS[args.kernel]))) < 1e-9  # weights sum to 0: an edge detector
    try:
        Image.fromarray(response_image(response, signed)).save(args.out, format="PNG")
    except OSError as exc:
        print(f"convray kernels: cannot write --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    shown = "|response| scaled to its maximum" if signed else "clipped to 0..255"
    padding_text = f"{args.padding} px padding" if isinstance(padding, int) else f"{args.padding} padding"
    print(
        f"wrote {args.out}  {args.kernel} ({padding_text}, stride {args.stride}): "
        f"{pixels.shape[2]}x{pixels.shape[1]} -> {response.shape[2]}x{response.shape[1]}, {shown}"
    )
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Load-test a server and print throughput, latency percentiles and errors."""
    from convray.service.bench import BenchConfig, concurrency_levels, format_report, format_sweep, run, servers_of

    width, _, height = args.image_size.partition("x")
    try:
        levels = concurrency_levels(args.concurrency)
        if len(levels) > 1 and args.rate is not None:
            raise ValueError("a sweep is of --concurrency levels; --rate runs open loop at one rate")
        if problem := client_problem(args):
            raise ValueError(problem)
        refused = [
            message
            for bad, message in (
                (args.connections < 1, f"--connections must be >= 1, got {args.connections}"),
                (args.rate is not None and not 0 < args.rate < math.inf,
                 f"--rate must be > 0 requests/s, got {args.rate}"),
                (args.requests is not None and args.requests < 1, f"--requests must be >= 1, got {args.requests}"),
                (not 0 < args.duration < math.inf, f"--duration must be > 0 s, got {args.duration}"),
                (not 0 <= args.warmup < math.inf, f"--warmup must be >= 0 s, got {args.warmup}"),
                (args.processes is not None and args.processes < 1, f"--processes must be >= 1, got {args.processes}"),
                (not 0 <= args.max_error_fraction <= 1,
                 f"--max-error-fraction must be from 0 to 1, got {args.max_error_fraction}"),
                (not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)?", args.image_size),
                 f"--image-size is WxH (or one number for a square), got {args.image_size!r}"),
                (args.image_format.upper() not in IMAGE_FORMATS,
                 f"--image-format must be one of {', '.join(sorted(IMAGE_FORMATS))}, got {args.image_format!r}"),
            )
            if bad
        ]  # fmt: skip
        if refused:
            raise ValueError("; ".join(refused))
    except ValueError as exc:
        print(f"convray bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    servers = len(servers_of(args.server))
    base = BenchConfig(
        server=args.server, api=args.api, model=args.model, payload=args.payload, datatype=args.datatype,
        batch_size=args.batch_size, concurrency=levels[0], rate_per_s=args.rate, duration_s=args.duration,
        requests=args.requests, warmup_s=args.warmup, images=args.images,
        image_size=(int(width), int(height or width)), image_format=args.image_format.upper(),
        channels=args.channels, timeout_s=args.timeout, processes=args.processes or max(1, servers),
        streaming=args.streaming, connections=args.connections, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, token_file=args.token_file,
    )  # fmt: skip
    sweep = len(levels) > 1  # then a level gets no more client processes than requests in flight (one per server)
    configs = [
        dataclasses.replace(
            base, concurrency=level, processes=max(servers, min(base.processes, level)) if sweep else base.processes
        )
        for level in levels
    ]
    reports = []
    for config in configs:  # one level after another, each with its own warm-up
        try:
            reports.append(asyncio.run(run(config)))
        except TimeoutError as exc:  # before OSError, its base class
            print(f"convray bench: {exc or f'cannot reach a server at {args.server}'}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except (ValueError, OSError) as exc:
            print(f"convray bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(format_report(reports[-1]), flush=True)
    if len(reports) > 1:
        print(format_sweep(reports))
    if args.json:
        as_dicts = [dataclasses.asdict(report) for report in reports]
        written = as_dicts[0] if len(as_dicts) == 1 else {"levels": as_dicts}
        Path(args.json).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    failed = [report for report in reports if not report.passed(args.max_error_fraction)]
    for report in failed:
        level = "" if args.rate is not None else f" at concurrency {report.config['concurrency']}"
        why = "none succeeded" if report.ok == 0 else f"over --max-error-fraction {args.max_error_fraction:g}"
        print(
            f"convray bench: {report.requests - report.ok} of {report.requests} requests failed{level}, {why}",
            file=sys.stderr,
        )
    return EXIT_FAILED if failed else EXIT_OK


def add_client_commands(commands: Any) -> None:
    """Add classify, models, bench, explain and kernels to the ``convray`` sub-command parsers."""

    def security_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (turns TLS on)")
        p.add_argument("--tls-cert", default=None, help="PEM client certificate, for mutual TLS")
        p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
        p.add_argument("--token-file", default=None, help="file with the bearer token the server requires")

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default="localhost:50051",
                       help="HOST:PORT of a convray server (default: %(default)s)")  # fmt: skip
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: %(default)g)")
        p.add_argument("--connect-timeout", type=float, default=5.0,
                       help="seconds to wait for the server (default: %(default)g)")  # fmt: skip
        security_flags(p)
        p.add_argument("--retries", type=int, default=3, choices=range(5), metavar="0..4",
                       help="times a call refused as overloaded or unavailable is sent again, after the delay "
                            "the server advises (default 3)")  # fmt: skip

    classify = commands.add_parser("classify", help="classify image files", description=cmd_classify.__doc__)
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="classes per image (default: 3, or fewer if the model has fewer classes)",
    )
    classify.add_argument("--model", default="", help="model name (default: the server's default model)")
    classify.add_argument("--version", type=int, default=0, help="model version (default: latest loaded)")
    classify.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line and file, in order; a failed one is {"image", "error": {"code", "message"}}, '
        "code a gRPC status name, or UNREADABLE_FILE for a file that could not be read",
    )
    classify.add_argument(
        "--in-flight",
        type=int,
        default=16,
        help="requests sent at once, so the server can batch them (answers print in file order; default: %(default)s)",
    )
    client_flags(classify)
    classify.set_defaults(run=cmd_classify)

    models = commands.add_parser("models", help="list served models", description=cmd_models.__doc__)
    client_flags(models)
    models.set_defaults(run=cmd_models)

    bench = commands.add_parser("bench", help="load-test a server", description=cmd_bench.__doc__)
    bench.add_argument("--server", default="localhost:50051",
                       help="HOST:PORT of a convray or OIP server; several, comma-separated, share the load "
                            "(e.g. front-end pods addressed directly)")  # fmt: skip
    bench.add_argument("--api", default="native", choices=["native", "oip", "rest"],
                       help="rest: the Open Inference Protocol over HTTP/REST, with --server at the server's "
                            "--http-port (binary tensor data, as tritonclient.http sends)")  # fmt: skip
    bench.add_argument("--model", default="digits", help="model to load (default: digits, the shipped model)")
    bench.add_argument("--payload", default="image", choices=["image", "tensor"],
                       help="encoded images, or (oip) pixel tensors shaped from ModelMetadata")  # fmt: skip
    bench.add_argument("--datatype", default="FP32", choices=["FP32", "UINT8"],
                       help="of --payload tensor: UINT8 sends a quarter of FP32's bytes")  # fmt: skip
    bench.add_argument("--batch-size", type=int, default=1,
                       help="images per request (oip, rest; at most the server's --max-batch-size)")  # fmt: skip
    bench.add_argument("--concurrency", default="1",
                       help="closed loop: requests in flight; several, comma-separated (1,8,32), measure each in "
                            "turn and end with a table")  # fmt: skip
    bench.add_argument("--rate", type=float, default=None, help="open loop instead: requests started per second")
    bench.add_argument("--streaming", action="store_true",
                       help="send over the API's bidirectional stream (ClassifyStream, ModelStreamInfer) instead "
                            "of unary calls: one stream per concurrent request (--rate: --concurrency streams in "
                            "turn)")  # fmt: skip
    bench.add_argument("--processes", type=int, default=None,
                       help="client processes to split the load over, when one is not enough "
                            "(default: one per --server)")  # fmt: skip
    bench.add_argument("--connections", type=int, default=1,
                       help="connections each client process opens, requests taken in turn (a server run with "
                            "--frontends N gives each connection to one of its front ends)")  # fmt: skip
    bench.add_argument("--duration", type=float, default=10.0, help="seconds to measure")
    bench.add_argument("--requests", type=int, default=None, help="measure this many requests instead")
    bench.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring")
    bench.add_argument("--images", default=None, help="folder of images to send (default: generated)")
    bench.add_argument("--image-size", default="8x8", help="WxH of generated images")
    bench.add_argument("--image-format", default="png", help="format of generated images")
    bench.add_argument("--channels", type=int, default=1, choices=[1, 3], help="of generated images")
    bench.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    bench.add_argument(
        "--max-error-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="exit 1 when more than this fraction of measured requests fail (default 0: any; "
        "1: only when none succeeds, e.g. to measure overload)",
    )
    security_flags(bench)
    bench.add_argument("--json", default=None,
                       help="also write the report to this file (a sweep: {'levels': [reports]})")  # fmt: skip
    bench.set_defaults(run=cmd_bench)

    explain = commands.add_parser(
        "explain", help="feature maps and class activation maps of an image", description=cmd_explain.__doc__
    )
    explain.add_argument("image", metavar="IMAGE")
    explain.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder the PNGs are written to; cam-*.png files already there are replaced by this image's",
    )
    explain.add_argument("--model", default="", help="model name (default: the server's default model)")
    explain.add_argument("--version", type=int, default=0, help="model version (default: latest loaded)")
    explain.add_argument("--blocks", nargs="+", metavar="BLOCK", help="e.g. block0_conv block3_conv (default: all)")
    explain.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="classes that get a class activation map (default: the server's --default-top-k, "
        "capped at the model's classes and --explain-max-top-k)",
    )
    explain.add_argument("--method", default="auto", choices=["auto", "cam", "grad-cam"])
    client_flags(explain)
    explain.set_defaults(run=cmd_explain)

    kernels = commands.add_parser(
        "kernels", help="apply a classic image kernel locally", description=cmd_kernels.__doc__
    )
    kernels.add_argument("image", metavar="IMAGE")
    kernels.add_argument("--kernel", required=True, choices=sorted(KERNEL_NAMES))
    kernels.add_argument("--out", required=True, metavar="FILE", help="PNG file to write")
    kernels.add_argument("--padding", default="same", help="same, valid or pixels per side, 0-31 (default same)")
    kernels.add_argument("--stride", type=int, default=1, help="1-16, as a conv block allows (default 1)")
    kernels.set_defaults(run=cmd_kernels)
