"""``convray bench``: a load generator for convray (or any Open Inference Protocol server).

Closed loop (``concurrency`` callers, each sending its next request when the last is answered) or
open loop (``rate_per_s`` requests started on a fixed schedule, whatever the answers). Requests are
serialised once up front and sent as raw bytes over one grpc.aio channel, so the client spends its
time on the wire, not on protobuf; it reports its own CPU use and says when it was the bottleneck.
With ``processes`` > 1 the load is split over that many client processes (one Python process tops out
at several thousand requests a second), which start measuring together; their figures are merged.
Several servers (``server`` "A,B", e.g. front-end pods addressed directly) share the client processes
out between them, so a fleet of front ends is measured as one. With ``streaming`` the requests go over the
API's bidirectional stream instead of unary calls (``bench_stream``), like perf_analyzer's ``--streaming``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import multiprocessing
import os
import queue
import resource
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import aiohttp
import grpc
import numpy as np

from convray.service import bench_rest
from convray.service.bench_rest import RestClient, RestRequest, RestSender
from convray.service.bench_stream import (
    CLASSIFY_STREAM,
    MODEL_STREAM_INFER,
    Outcome,
    StreamCaller,
    classify_stream_outcome,
    model_stream_infer_outcome,
)
from convray.service.credentials import bearer_metadata, channel_credentials

CLASSIFY = "/convray.v1.Classifier/Classify"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
STREAM_OF = {  # each unary method's stream counterpart, and how to read a stream reply's status
    CLASSIFY: (CLASSIFY_STREAM, classify_stream_outcome),
    MODEL_INFER: (MODEL_STREAM_INFER, model_stream_infer_outcome),
}


@dataclass
class BenchConfig:
    """What to send, how hard and for how long."""

    server: str = "localhost:50051"  # HOST:PORT, or several separated by commas (one per client process at least)
    api: Literal["native", "oip", "rest"] = "native"  # rest: the OIP over HTTP/REST (the server's --http-port)
    model: str = "digits"
    payload: Literal["image", "tensor"] = "image"  # encoded image bytes, or an OIP pixel tensor
    datatype: Literal["FP32", "UINT8"] = "FP32"  # of a tensor payload: UINT8 puts a quarter of the bytes on the wire
    batch_size: int = 1  # images per request (OIP only), like perf_analyzer's -b
    concurrency: int = 1  # closed loop: callers in flight
    rate_per_s: float | None = None  # open loop instead: requests started per second
    duration_s: float = 10.0
    requests: int | None = None  # stop after this many measured requests instead of after duration_s
    warmup_s: float = 2.0
    images: str | None = None  # a folder of images; default: generated
    image_size: tuple[int, int] = (8, 8)  # width, height of generated images
    image_format: str = "PNG"
    channels: int = 1  # of generated images (1 grey, 3 RGB)
    timeout_s: float = 30.0
    processes: int = 1  # client processes the concurrency (or rate, or request count) is split over
    # Connections each client process opens to its server, requests taken in turn: a server of several front-end
    # processes on one port (`convray serve --frontends N`) gives each connection to one of them.
    connections: int = 1
    # Over the API's bidirectional stream instead of unary calls: one stream per concurrent caller (open loop:
    # ``concurrency`` streams, taken in turn), each answered in order.
    streaming: bool = False
    # A server with TLS (``tls_ca``; mutual TLS adds ``tls_cert`` and ``tls_key``) or a bearer token: PEM and
    # token files, read by each client process.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None


@dataclass
class Measurement:
    """What one client process measured, before it is merged into a ``BenchReport``."""

    latencies_ms: list[float]  # of successful requests
    codes: dict[str, int]  # requests by status code name
    wall_s: float
    cpu_s: float  # the process's CPU seconds over the same span
    images_per_request: int
    server: str = ""  # the HOST:PORT it drove
    started_at: float = 0.0  # time.time() when measuring began; processes on one machine share this clock
    first_messages: dict[str, str] = field(default_factory=dict)  # an error code's first message


@dataclass
class BenchReport:
    """What a run measured. Latencies are of successful requests, in milliseconds."""

    config: dict[str, object]
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    client_cpu_fraction: float  # the client processes' CPU seconds per wall second (1.0 = one core busy)
    client_saturated: bool
    notes: list[str] = field(default_factory=list)
    per_server_requests_per_s: dict[str, float] = field(default_factory=dict)  # successful requests, by server
    first_error_messages: dict[str, str] = field(default_factory=dict)  # by code: why, as the server said it

    def passed(self, max_error_fraction: float = 0.0) -> bool:
        """Whether the run passes: something succeeded, and no more than that fraction of requests failed."""
        return self.ok > 0 and self.requests - self.ok <= max_error_fraction * self.requests


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean of latencies (linear interpolation; empty input gives NaN)."""
    if not values_ms:
        return {k: math.nan for k in ("p50", "p90", "p99", "max", "mean")}
    array = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(array.max()), 3),
        "mean": round(float(array.mean()), 3),
    }


def load_images(config: BenchConfig) -> list[bytes]:
    """Encoded images: every image file in ``config.images``, or 16 generated noise images."""
    if config.images:
        files = sorted(p for p in Path(config.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {config.images}")
        return [p.read_bytes() for p in files]
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = config.image_size
    shape = (height, width) if config.channels == 1 else (height, width, config.channels)
    encoded = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format=config.image_format)
        encoded.append(buffer.getvalue())
    return encoded


async def build_payloads(
    config: BenchConfig, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[str, list[bytes], int]:
    """The RPC path, the serialised requests to cycle through, and images per request."""
    from convray.oip import inference_pb2 as oip
    from convray.v1 import classifier_pb2 as pb

    if config.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {config.batch_size}")
    if config.api == "native":
        if config.payload != "image":
            raise ValueError("the native API takes encoded images only (--payload image)")
        if config.batch_size != 1:
            raise ValueError("the native Classify RPC takes one image per request; use --api oip for --batch-size")
        return (
            CLASSIFY,
            [pb.ClassifyRequest(image=i, model=config.model).SerializeToString() for i in load_images(config)],
            1,
        )
    requests, batch = [], config.batch_size
    if config.payload == "image":
        for raw in image_batches(load_images(config), batch):
            request = oip.ModelInferRequest(model_name=config.model)
            request.inputs.add(name="image", datatype="BYTES", shape=[batch])
            request.raw_input_contents.append(raw)
            requests.append(request.SerializeToString())
        return MODEL_INFER, requests, batch
    metadata_call = channel.unary_unary(
        MODEL_METADATA,
        request_serializer=oip.ModelMetadataRequest.SerializeToString,
        response_deserializer=oip.ModelMetadataResponse.FromString,
    )
    described = await metadata_call(
        oip.ModelMetadataRequest(name=config.model), timeout=config.timeout_s, metadata=metadata
    )
    shape = [batch, *list(next(t for t in described.inputs if t.name == "input").shape)[1:]]
    for raw in pixel_tensors(shape, config.datatype):
        request = oip.ModelInferRequest(model_name=config.model)
        request.inputs.add(name="input", datatype=config.datatype, shape=shape)
        request.raw_input_contents.append(raw)
        requests.append(request.SerializeToString())
    return MODEL_INFER, requests, batch


def image_batches(images: list[bytes], batch: int) -> list[bytes]:
    """The raw content of BYTES tensors of ``batch`` encoded images each, one starting at each image in turn."""
    batches = []
    for first in range(len(images)):
        chosen = [images[(first + i) % len(images)] for i in range(batch)]
        batches.append(b"".join(len(i).to_bytes(4, "little") + i for i in chosen))
    return batches


def pixel_tensors(shape: list[int], datatype: str, count: int = 16) -> list[bytes]:
    """The raw content of ``count`` random pixel tensors (0..255) of ``shape``, FP32 or UINT8; seeded."""
    rng = np.random.default_rng(0)
    dtype = {"FP32": "<f4", "UINT8": "u1"}[datatype]
    return [rng.integers(0, 256, shape).astype(dtype).tobytes() for _ in range(count)]


async def run(config: BenchConfig) -> BenchReport:
    """Warm up, then measure for ``duration_s`` (or ``requests``); returns the report.

    Raises:
        ValueError: the configuration cannot be run (the message says why).
        TimeoutError: no server answered at ``config.server`` within ``timeout_s``.
    """
    if config.concurrency < 1 and config.rate_per_s is None:
        raise ValueError("concurrency must be >= 1")
    if config.processes == 1 and len(servers_of(config.server)) == 1:
        return report_of(config, [await measure(config)])
    parts = split_load(config)
    return report_of(config, await asyncio.get_running_loop().run_in_executor(None, _measure_in_processes, parts))


def servers_of(server: str) -> list[str]:
    """The HOST:PORT addresses in a ``BenchConfig.server`` (comma-separated)."""
    return [address.strip() for address in server.split(",") if address.strip()]


def split_load(config: BenchConfig) -> list[BenchConfig]:
    """One configuration per client process: the concurrency, rate and request count shared out.

    Several servers are given out round-robin: process i drives server i modulo their number. Each server gets an
    equal share of the load however many processes drive it.

    Raises:
        ValueError: fewer concurrent requests (or requests) than processes, or fewer processes than servers.
    """
    n, servers = config.processes, servers_of(config.server)
    if n < 1:
        raise ValueError(f"processes must be >= 1, got {n}")
    if not servers:
        raise ValueError("no server given")
    if n < len(servers):
        raise ValueError(f"{len(servers)} servers need at least as many client processes, got --processes {n}")
    if config.rate_per_s is None and config.concurrency < n:
        raise ValueError(f"--concurrency {config.concurrency} cannot be split over {n} processes")
    if config.requests is not None and config.requests < n:
        raise ValueError(f"--requests {config.requests} cannot be split over {n} processes")

    def share(total: int, i: int, among: int) -> int:
        return total // among + (1 if i < total % among else 0)

    def processes_on(i: int) -> int:
        """How many processes drive process ``i``'s server."""
        return share(n, i % len(servers), len(servers))

    def part(total: int, i: int) -> int:
        """Process ``i``'s part of ``total``: its server's equal share, split over that server's processes.

        Split per process instead, 3 processes on 2 servers gave one server two thirds of the load.
        """
        return share(share(total, i % len(servers), len(servers)), i // len(servers), processes_on(i))

    open_loop = config.rate_per_s is not None
    return [
        replace(
            config,
            server=servers[i % len(servers)],
            processes=1,
            concurrency=config.concurrency if open_loop else part(config.concurrency, i),
            rate_per_s=config.rate_per_s / len(servers) / processes_on(i) if open_loop else None,
            requests=None if config.requests is None else part(config.requests, i),
        )
        for i in range(n)
    ]


def _measure_in_processes(parts: list[BenchConfig]) -> list[Measurement]:
    """Run ``measure`` in one spawned process per part; they start warming up together."""
    context = multiprocessing.get_context("spawn")  # not fork: grpc's threads do not survive a fork
    start = context.Barrier(len(parts))
    results = context.Queue()
    children = [
        context.Process(target=_child, args=(i, part, start, results), daemon=True) for i, part in enumerate(parts)
    ]
    for child in children:
        child.start()
    first = parts[0]
    budget_s = first.warmup_s + (first.duration_s if first.requests is None else 3600.0) + first.timeout_s + 120
    deadline = time.monotonic() + budget_s
    measurements: list[Measurement] = []
    failures: list[tuple[str, str]] = []  # (exception type name, message)
    reported: set[int] = set()
    try:
        while len(measurements) + len(failures) < len(children):  # each child reports exactly once
            try:
                index, outcome = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client processes did not finish within {budget_s:.0f} s") from None
                # A child that died without a word (killed, out of memory) would otherwise be waited for to the end.
                # (One that died after reporting, e.g. in grpc's teardown, has said what it had to.)
                silent = [c for i, c in enumerate(children) if i not in reported and c.exitcode not in (None, 0)]
                if silent:
                    raise RuntimeError(
                        f"a client process died (exit code {silent[0].exitcode}) before reporting its measurement"
                    ) from None
                continue
            reported.add(index)
            if isinstance(outcome, Measurement):
                measurements.append(outcome)
            else:
                failures.append(outcome)
    finally:
        for child in children:
            if child.is_alive() and len(measurements) + len(failures) < len(children):
                child.terminate()
            child.join(5)
    if failures:
        # The processes that only saw the start line broken report that; the cause is another's failure.
        kind, message = next((f for f in failures if f[0] != "BrokenBarrierError"), failures[0])
        raise {"TimeoutError": TimeoutError, "ValueError": ValueError, "OSError": OSError}.get(kind, RuntimeError)(
            message
        )
    return measurements


def _child(index: int, config: BenchConfig, start: threading.Barrier, results: multiprocessing.Queue) -> None:
    """Client process ``index``: measure, and put ``(index, outcome)`` on ``results``.

    The outcome is the ``Measurement``, or the error's type and message.

    It ends with its parent: a parent killed mid-run would otherwise leave it sending load for the whole run.
    """
    # Also the way out of exiting while the result is stuck in a full pipe no one reads any more.
    threading.Thread(target=_exit_when_orphaned, args=(multiprocessing.parent_process(),), daemon=True).start()
    try:
        results.put((index, asyncio.run(measure(config, start))))
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        start.abort()  # the others must not wait for this one at the start line
        results.put((index, (type(exc).__name__, str(exc) or type(exc).__name__)))


def _exit_when_orphaned(parent: multiprocessing.process.BaseProcess | None) -> None:
    while parent is not None and parent.is_alive():
        time.sleep(0.5)
    os._exit(1)


async def measure(config: BenchConfig, start: threading.Barrier | None = None) -> Measurement:
    """One process's run: connect, warm up, measure. ``start``, when given, is waited at before warming up."""
    if config.connections < 1:
        raise ValueError(f"connections must be >= 1, got {config.connections}")
    async with contextlib.AsyncExitStack() as stack:
        connect = _connect_rest if config.api == "rest" else _connect_grpc
        send, payloads, images_per_request = await connect(config, stack)
        if start is not None:
            start.wait(timeout=config.timeout_s + 60)  # nothing else runs on this loop yet: blocking is fine
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        first_messages: dict[str, str] = {}
        measuring = False
        budget = [config.requests or 0]  # measured requests still to start, with --requests

        async def one(index: int) -> None:
            started = time.perf_counter()
            code, message = await send(index, payloads[index % len(payloads)])
            if measuring:
                codes[code] += 1
                if code == "OK":
                    latencies.append((time.perf_counter() - started) * 1e3)
                elif code not in first_messages and message:
                    first_messages[code] = message

        def more() -> bool:
            """Whether to start another request: always, unless --requests is used up."""
            if not measuring or config.requests is None:
                return True
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

        async def closed_loop(worker: int, until: float) -> None:
            index = worker
            while time.perf_counter() < until and more():
                await one(index)
                index += config.concurrency

        async def open_loop(until: float) -> None:
            interval, pending, index = 1.0 / float(config.rate_per_s or 1), set(), 0
            next_at = time.perf_counter()
            while time.perf_counter() < until and more():
                task = asyncio.create_task(one(index))
                pending.add(task)
                task.add_done_callback(pending.discard)
                index += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if pending:
                await asyncio.gather(*pending)

        async def phase(seconds: float) -> None:
            until = time.perf_counter() + seconds
            if config.rate_per_s is not None:
                await open_loop(until)
            else:
                await asyncio.gather(*(closed_loop(w, until) for w in range(config.concurrency)))

        await phase(config.warmup_s)
        measuring = True
        cpu_start, wall_start, started_at = _cpu_seconds(), time.perf_counter(), time.time()
        await phase(config.duration_s if config.requests is None else 3600.0)
        wall = time.perf_counter() - wall_start
        cpu = _cpu_seconds() - cpu_start
        await send.close()
    return Measurement(latencies, dict(codes), wall, cpu, images_per_request, config.server, started_at, first_messages)


async def _connect_grpc(config: BenchConfig, stack: contextlib.AsyncExitStack) -> tuple[_Sender, list[bytes], int]:
    """Open the gRPC channels (closed with ``stack``); the sender, the requests to cycle through, images in each."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    if config.connections > 1:  # grpc shares one connection among a process's channels to a target unless told
        options.append(("grpc.use_local_subchannel_pool", 1))
    credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    metadata = bearer_metadata(config.token_file)
    channels = [
        await stack.enter_async_context(
            grpc.aio.insecure_channel(config.server, options=options)
            if credentials is None
            else grpc.aio.secure_channel(config.server, credentials, options=options)
        )
        for _ in range(config.connections)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=config.timeout_s)
    except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
        hint = "" if credentials else " (a TLS server needs --tls-ca)"
        raise TimeoutError(f"cannot reach a server at {config.server} within {config.timeout_s:g} s{hint}") from None
    method, payloads, images_per_request = await build_payloads(config, channels[0], metadata)
    return _Sender(config, channels, method, metadata), payloads, images_per_request


async def _connect_rest(
    config: BenchConfig, stack: contextlib.AsyncExitStack
) -> tuple[RestSender, list[RestRequest], int]:
    """Open an HTTP session to the REST port (closed with ``stack``); the sender, the requests, images in each."""
    if config.streaming:
        raise ValueError("--streaming needs a gRPC API (--api native or oip): the REST API has no stream")
    tls = bench_rest.ssl_context(config.tls_ca, config.tls_cert, config.tls_key)
    # A connection per request in flight (HTTP/1.1 carries one at a time), kept open between requests.
    connector = aiohttp.TCPConnector(limit=0, ssl=tls if tls is not None else False)
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
    client = RestClient(session, config.server, tls is not None, dict(bearer_metadata(config.token_file) or ()),
                        config.timeout_s)  # fmt: skip
    await client.wait_live()
    batch = config.batch_size
    if config.payload == "image":
        tensor = {"name": "image", "shape": [batch], "datatype": "BYTES"}
        raws = image_batches(load_images(config), batch)
    else:
        shape = [batch, *(await client.input_shape(config.model))[1:]]
        tensor, raws = (
            {"name": "input", "shape": shape, "datatype": config.datatype},
            pixel_tensors(shape, config.datatype),
        )
    return client.sender(config.model), [bench_rest.inference_request(tensor, raw) for raw in raws], batch


class _Sender:
    """Sends a request and returns its outcome (code, message): by unary call or over one of ``concurrency`` streams.

    Request ``index`` goes on stream ``index`` modulo their number, so a closed-loop caller keeps its own stream;
    unary calls take the channels in turn the same way, and stream ``j`` opens on channel ``j`` modulo theirs.
    """

    def __init__(
        self,
        config: BenchConfig,
        channels: list[grpc.aio.Channel],
        method: str,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._timeout_s = config.timeout_s
        self._metadata = metadata or None
        # bytes in, bytes out: no (de)serialisation on the client
        self._unary = [channel.unary_unary(method) for channel in channels]
        self._streams: list[StreamCaller] = []
        if config.streaming:
            stream_method, outcome_of = STREAM_OF[method]
            self._streams = [
                StreamCaller(channels[j % len(channels)], stream_method, outcome_of, metadata)
                for j in range(config.concurrency)
            ]

    async def __call__(self, index: int, payload: bytes) -> Outcome:
        if self._streams:
            return await self._streams[index % len(self._streams)](payload, self._timeout_s)
        try:
            await self._unary[index % len(self._unary)](payload, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    async def close(self) -> None:
        """Finish the streams (nothing to do for unary calls)."""
        await asyncio.gather(*(stream.close(self._timeout_s) for stream in self._streams))


def report_of(config: BenchConfig, measurements: list[Measurement]) -> BenchReport:
    """One report from the client processes' measurements (rates add up; latencies pool)."""
    codes: Counter[str] = Counter()
    for m in measurements:
        codes.update(m.codes)
    ok = codes.get("OK", 0)
    wall = _window(measurements)  # one window for all: rates over processes' own spans do not add up
    requests_per_s = ok / wall
    per_server = {
        server: sum(m.codes.get("OK", 0) for m in ms) / _window(ms)
        for server in {m.server for m in measurements}
        if (ms := [m for m in measurements if m.server == server])
    }
    busiest = max(m.cpu_s / m.wall_s for m in measurements)
    notes = []
    if busiest > 0.9:
        many = " (add --processes)" if len(measurements) == 1 else " (add more --processes)"
        notes.append(f"a client process used over 90% of a core: it may have been the bottleneck{many}")
    sent_per_s = sum(codes.values()) / wall
    if config.rate_per_s is not None and sent_per_s < 0.95 * config.rate_per_s:
        notes.append(
            f"sent {sent_per_s:,.1f} requests/s of the {config.rate_per_s:,g} asked: the client fell behind its "
            "schedule (add --processes, or lower --rate); the latencies are of an open loop that did not hold"
        )
    return BenchReport(
        config={k: v for k, v in asdict(config).items()},
        requests=sum(codes.values()),
        ok=ok,
        errors={k: v for k, v in sorted(codes.items()) if k != "OK"},
        duration_s=round(wall, 3),
        requests_per_s=round(requests_per_s, 1),
        images_per_s=round(requests_per_s * measurements[0].images_per_request, 1),
        latency_ms=percentiles([latency for m in measurements for latency in m.latencies_ms]),
        client_cpu_fraction=round(sum(m.cpu_s for m in measurements) / wall, 3),
        client_saturated=busiest > 0.9,
        notes=notes,
        per_server_requests_per_s={server: round(rate, 1) for server, rate in sorted(per_server.items())},
        first_error_messages={
            code: message for m in reversed(measurements) for code, message in m.first_messages.items()
        },
    )


def _window(measurements: list[Measurement]) -> float:
    """Seconds from the first measurement's start to the last one's end (the longest span if clocks are absent)."""
    if any(m.started_at == 0.0 for m in measurements):
        return max(m.wall_s for m in measurements)
    return max(m.started_at + m.wall_s for m in measurements) - min(m.started_at for m in measurements)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def concurrency_levels(text: str) -> list[int]:
    """The levels of ``--concurrency``: one number, or several separated by commas for a sweep ("1,8,32").

    Raises:
        ValueError: not positive integers, or a level given twice.
    """
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"concurrency must be a positive integer or several, comma-separated; got {text!r}") from None
    if any(level < 1 for level in levels):
        raise ValueError(f"concurrency levels must be >= 1, got {text!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"concurrency levels must differ, got {text!r}")
    return levels


def format_sweep(reports: list[BenchReport]) -> str:
    """One line per concurrency level of a sweep: throughput, latency percentiles and errors."""
    lines = [
        "concurrency      req/s      img/s   p50 ms   p90 ms   p99 ms  errors",
        *(
            f"{r.config['concurrency']:>11} {r.requests_per_s:>10,.1f} {r.images_per_s:>10,.1f} "
            f"{r.latency_ms['p50']:>8.2f} {r.latency_ms['p90']:>8.2f} {r.latency_ms['p99']:>8.2f}  "
            f"{sum(r.errors.values()) or 'none'}"
            for r in reports
        ),
    ]
    return "\n".join(lines)


def format_report(report: BenchReport) -> str:
    """A few human-readable lines."""
    lat = report.latency_ms
    mode = (
        f"rate {report.config['rate_per_s']}/s"
        if report.config["rate_per_s"]
        else f"concurrency {report.config['concurrency']}"
    )
    payload = report.config["payload"]
    if payload == "tensor":
        payload = f"tensor {report.config['datatype']}"
    if report.config["batch_size"] != 1:
        payload += f", {report.config['batch_size']} images per request"
    if report.config["streaming"]:
        mode += ", streaming"
    if report.config["processes"] != 1:
        mode += f" over {report.config['processes']} client processes"
    if report.config.get("connections", 1) != 1:
        mode += f", {report.config['connections']} connections each"
    lines = [
        f"{report.config['api']} {payload} -> {report.config['server']} model {report.config['model']}, {mode}",
        f"  {report.ok} OK of {report.requests} in {report.duration_s:.1f} s: {report.requests_per_s:,.1f} req/s, "
        f"{report.images_per_s:,.1f} img/s",
        f"  latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}",
        f"  errors: {report.errors or 'none'}; client CPU {report.client_cpu_fraction:.0%} of a core",
    ]
    if len(report.per_server_requests_per_s) > 1:
        shares = ", ".join(f"{server} {rate:,.1f}" for server, rate in report.per_server_requests_per_s.items())
        lines.append(f"  req/s by server: {shares}")
    lines += [f"  first {code}: {message}" for code, message in sorted(report.first_error_messages.items())]
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)
