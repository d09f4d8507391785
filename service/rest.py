"""The Open Inference Protocol over HTTP/REST (KServe v2, with Triton's binary tensor data), for REST clients.

``tritonclient.http``, KServe's and MLServer's REST clients and plain ``curl`` reach the same models as the gRPC
API, through the same checks, batching and metrics: each REST call is handed to an ``InferenceServicer`` as
the matching gRPC request (``rest_codec``), and its reply or status comes back as JSON. Status codes follow
Google's mapping of gRPC codes onto HTTP (``google/rpc/code.proto``): INVALID_ARGUMENT is 400, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429 with ``Retry-After``, UNAVAILABLE 503; an error's body is ``{"error": "<message>"}``.

Served with aiohttp on ``--http-port`` beside gRPC, with the same TLS files and bearer token; health endpoints
need no token, as gRPC health checks need none. Requests are counted under ``api="rest"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from aiohttp import web

from convray.oip import inference_pb2 as oip
from convray.service import __version__
from convray.service.errors import HTTP_STATUS, ConvrayError, InvalidInput, ModelNotReady
from convray.service.oip_servicer import InferenceServicer
from convray.service.ray_watch import RayGate
from convray.service.registry import ModelRegistry
from convray.service.rest_codec import (
    HEADER_LENGTH,
    add_repository_parameters,
    infer_response_body,
    message_json,
    parse_index_request,
    parse_infer_request,
)
from convray.service.security import BearerToken

log = logging.getLogger(__name__)
T = TypeVar("T")

REST_EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "model_repository", "statistics"]
MAX_JSON_BYTES = 4 * 1024 * 1024
"""The largest JSON part of an inference request: one 3x224x224 image of FP32 pixels at full precision fits (2.8 MB).
The parse holds the GIL throughout, so it stops the event loop even in a thread: 4 MiB of the slowest numbers take
orjson about 40 ms (the standard library's ``json`` took 0.8 s for 2 MiB), and the containers and strings that parse
slower still are counted first (``rest_codec.MAX_JSON_CONTAINERS``). Parsed JSON takes many times its text's size
(2 MiB of numbers, 32 MiB). Larger tensors go as binary data after the JSON, which costs neither (within
--max-message-bytes)."""
PARSE_OFF_THE_LOOP_BYTES = 64 * 1024
"""Bodies past this are parsed in a decode thread, one at a time (3 MB of JSON numbers took the standard library 135 ms
here): the loop still waits on the GIL, but gRPC's own threads and the other decode threads get turns."""
CANCEL_AFTER_GRACE_S = 0.1  # once the drain's grace is over, how long a call in flight may take to end when cancelled
_NOT_READY = 400  # readiness endpoints: "4xx = false" (KServe), as Triton answers


class Refused(Exception):
    """A REST call answered with a gRPC status: what the servicer's ``context.abort`` raised."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None, status: int | None = None
    ) -> None:
        """``status``: the HTTP status, when not the one ``code`` maps to."""
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s
        self.status = HTTP_STATUS.get(code, 500) if status is None else status


class _RestCall:
    """What an OIP servicer method asks of its gRPC context, for a REST call: no deadline, and ``abort``."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        pushback = dict(trailing_metadata or ()).get("grpc-retry-pushback-ms")
        raise Refused(code, details, None if pushback is None else int(pushback) / 1000)


class RestFrontEnd:
    """The REST endpoints of one front end, over its registry and an OIP servicer counting as ``api="rest"``.

    Args:
        servicer: answers every call, as it would the matching gRPC one.
        registry: the models served, for readiness.
        gate: the front end's ``RayGate``: while Ray is lost inference is refused UNAVAILABLE (503), and calls in
            flight when it is lost are failed so, as over gRPC.
        token: the bearer token every call but health checks must carry; None: none needed.
        max_body_bytes: the largest request body read (``--max-message-bytes``); larger ones get 413.
        parser: where large bodies are parsed, off the event loop (the front end's decode threads).
    """

    def __init__(
        self,
        servicer: InferenceServicer,
        registry: ModelRegistry,
        gate: RayGate,
        token: BearerToken | None,
        max_body_bytes: int,
        parser: Executor,
    ) -> None:
        self._servicer, self._registry, self._gate = servicer, registry, gate
        self._token = token
        self._parser = parser
        self._max_body_bytes = max_body_bytes
        self._parsing_large = asyncio.Semaphore(1)  # a parse holds the GIL: one large one at a time
        self._draining = False
        middlewares = [self._count, self._authorise, self._json_errors]
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        self.app.add_routes(
            [
                web.get("/v2/health/live", self._live),
                web.get("/v2/health/ready", self._ready),
                web.get("/v2", self._server_metadata),
                web.get("/v2/models/stats", self._statistics),  # before {name}: as in Triton, no model is "stats"
                *(web.get(path + "/stats", self._statistics) for path in (model, version)),
                web.post("/v2/repository/index", self._repository_index),
                web.post("/v2/repository/models/{name}/load", self._load),
                web.post("/v2/repository/models/{name}/unload", self._unload),
                *(web.get(path, self._model_metadata) for path in (model, version)),
                *(web.get(path + "/ready", self._model_ready) for path in (model, version)),
                *(web.get(path + "/config", self._model_config) for path in (model, version)),
                *(web.post(path + "/infer", self._infer) for path in (model, version)),
            ]
        )
        self._runner: web.AppRunner | None = None
        self._sites: list[web.SockSite] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None, share_port: bool) -> int:
        """Listen on every address ``host`` resolves to, as gRPC does, at ``port`` (0 picks one); the port bound.

        ``share_port``: SO_REUSEPORT, for the front ends of ``--frontends``. An address that cannot be bound (IPv6
        where it is off) is skipped, as gRPC skips it, when another one is.

        Raises:
            OSError: no address could be bound.
        """
        listening: list[socket.socket] = []
        failure: OSError | None = None
        for family, address in listening_addresses(host, port):
            bound = listening[0].getsockname()[1] if listening else port  # one port for all, when port is 0
            dual = family == socket.AF_INET6 and address == "::" and socket.has_dualstack_ipv6()
            try:
                listening.append(socket.create_server((address, bound), family=family, reuse_port=share_port,
                                                      dualstack_ipv6=dual))  # fmt: skip
            except OSError as exc:
                failure = failure or exc
        if not listening:
            raise failure or OSError(f"{host} resolves to no address")
        # Calls in flight are waited for in stop(); past its grace, cleanup cancels them at once (0 would mean never:
        # aiohttp reads a timeout of 0 as none).
        # Bodies are inflated by ``_body``, off the event loop and bounded, not by aiohttp (see ``_inflated``).
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=CANCEL_AFTER_GRACE_S, auto_decompress=False
        )
        await self._runner.setup()
        self._sites = [web.SockSite(self._runner, sock, ssl_context=ssl_context) for sock in listening]
        for site in self._sites:
            await site.start()
        return int(listening[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Drain: stop listening, refuse new calls (503), give those in flight ``grace_s``, then cancel them."""
        self._draining = True
        runner, sites, self._runner, self._sites = self._runner, self._sites, None, []
        if runner is None:  # never started, or stopped already
            return
        for site in sites:
            await site.stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await runner.cleanup()

    # ---- middlewares ----

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        """Track calls in flight for the drain; once it has begun, refuse new ones but health checks (503)."""
        if self._draining and not request.path.startswith("/v2/health/"):
            return _error(503, "the server is shutting down; retry on another")
        self._in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    @web.middleware
    async def _authorise(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        """Refuse a call without the bearer token (401) before its body is read; health checks need none."""
        if self._token is None or request.path.startswith("/v2/health/"):
            return await handler(request)
        if self._token.admits(request.headers.get("Authorization", "")):
            return await handler(request)
        return _error(401, "missing or invalid bearer token: send the header 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        """Refusals, and aiohttp's own errors (no such path, body too large), as ``{"error": ...}`` bodies."""
        try:
            return await handler(request)
        except Refused as refused:
            retry = {} if refused.retry_after_s is None else {"Retry-After": str(math.ceil(refused.retry_after_s))}
            return _error(refused.status, refused.message, retry)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, f"{exc.reason}: {request.method} {request.path[:200]}")
        except Exception:  # noqa: BLE001 (a bug of ours: answered, with a JSON body, and logged with its traceback)
            log.exception("REST %s %s failed unexpectedly", request.method, request.path[:200])
            return _error(500, "internal error (logged by the server)")

    # ---- health and metadata ----

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self._registry.ready and not self._draining and not self._gate.lost
        return web.Response(status=200 if ready else _NOT_READY)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "convray", "version": __version__, "extensions": REST_EXTENSIONS})

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        reply = await self._servicer.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version), _RestCall())
        return web.json_response(message_json(reply))

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        reply = await self._servicer.ModelReady(oip.ModelReadyRequest(name=name, version=version), _RestCall())
        return web.Response(status=200 if reply.ready and not self._gate.lost else _NOT_READY)

    async def _model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        reply = await self._servicer.ModelConfig(oip.ModelConfigRequest(name=name, version=version), _RestCall())
        return web.json_response(message_json(reply.config))

    # ---- statistics and repository (Triton's extensions) ----

    async def _statistics(self, request: web.Request) -> web.Response:
        statistics = oip.ModelStatisticsRequest(
            name=_path_part(request, "name"), version=_path_part(request, "version")
        )
        return web.json_response(message_json(await self._servicer.ModelStatistics(statistics, _RestCall())))

    async def _repository_index(self, request: web.Request) -> web.Response:
        """Triton's answer: a JSON list of {name, version, state, reason}; ``{"ready": true}`` lists READY ones."""
        index_request = _parsed_small(parse_index_request, await self._small_body(request))
        index = await self._servicer.RepositoryIndex(index_request, _RestCall())
        return web.json_response(message_json(index).get("models", []))

    async def _load(self, request: web.Request) -> web.Response:
        load = oip.RepositoryModelLoadRequest(model_name=_path_part(request, "name"))
        _parsed_small(add_repository_parameters, await self._small_body(request), load)
        await self._servicer.RepositoryModelLoad(load, _RestCall())
        return web.Response(status=200)

    async def _unload(self, request: web.Request) -> web.Response:
        unload = oip.RepositoryModelUnloadRequest(model_name=_path_part(request, "name"))
        _parsed_small(add_repository_parameters, await self._small_body(request), unload)
        await self._servicer.RepositoryModelUnload(unload, _RestCall())
        return web.Response(status=200)

    # ---- inference ----

    async def _infer(self, request: web.Request) -> web.Response:
        """Classify the images of one REST inference request, as ModelInfer would."""
        name, version = _model(request)
        if self._gate.lost:
            raise Refused(*self._servicer.refused("ModelInfer", ModelNotReady(self._gate.refusal()), name))
        try:
            async with self._gate.tracking():  # Ray lost from here on: this call fails UNAVAILABLE, as over gRPC
                infer_request, binary = await self._parse(request, name, version)
                reply = await self._servicer.ModelInfer(infer_request, _RestCall())
        except ModelNotReady as exc:  # Ray lost meanwhile (already counted, by the servicer or below)
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        payload, json_length = infer_response_body(reply, binary)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    async def _parse(self, request: web.Request, name: str, version: str) -> tuple[oip.ModelInferRequest, set[str]]:
        """Read and parse the body; a body refused is counted, and raised as ``Refused`` with its status."""
        try:
            body = await self._body(request, self._max_body_bytes)
        except Refused as refused:
            self._servicer.refused("ModelInfer", InvalidInput(refused.message), name)
            raise
        try:
            header_length = _header_length(request.headers.get(HEADER_LENGTH))
            if (json_bytes := len(body) if header_length is None else header_length) > MAX_JSON_BYTES:
                message = (f"the request's JSON is {json_bytes} bytes, past {MAX_JSON_BYTES}: send tensors as "
                           "binary data after the JSON (Triton's binary tensor extension)")  # fmt: skip
                self._servicer.refused("ModelInfer", InvalidInput(message), name)
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message, status=413)
            if len(body) <= PARSE_OFF_THE_LOOP_BYTES:
                return parse_infer_request(body, header_length, name, version)
            async with self._parsing_large:
                return await asyncio.get_running_loop().run_in_executor(
                    self._parser, parse_infer_request, body, header_length, name, version
                )
        except ConvrayError as exc:
            raise Refused(*self._servicer.refused("ModelInfer", exc, name)) from None

    async def _body(self, request: web.Request, limit: int) -> bytes:
        """The request's body, inflated where it is gzip or deflate (``Content-Encoding``), to at most ``limit`` bytes.

        tritonclient.http compresses requests so when asked, and Triton inflates them. The inflating is done in a
        decode thread (``_inflated``).

        Raises:
            Refused: 413 past ``limit`` (as sent or inflated), 415 for another encoding, 400 for data that does not
                inflate.
        """
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            if len(body) > limit:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is over {limit} bytes", status=413)
            return body
        if encoding not in ("gzip", "deflate"):
            message = f"Content-Encoding {encoding[:40]!r} is not supported: send gzip, deflate or none"
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message, status=415)
        return await asyncio.get_running_loop().run_in_executor(self._parser, _inflated, body, encoding, limit)

    async def _small_body(self, request: web.Request) -> bytes:
        """The body of a repository request, which holds a few fields at most: past that, refused unparsed."""
        too_large = Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request body is over {PARSE_OFF_THE_LOOP_BYTES} bytes"
        )
        try:
            return await self._body(request, PARSE_OFF_THE_LOOP_BYTES)
        except Refused as refused:
            raise too_large if refused.status == 413 else refused from None


def listening_addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
    """Each (family, address) ``host`` resolves to, in order, once each (``localhost``: often ::1 and 127.0.0.1)."""
    resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in resolved))


INFLATE_STEP_BYTES = 1 << 20
"""How much of a compressed body is fed to, and taken from, zlib at a time: zlib lets go of the GIL while it inflates,
but one call building 63 MiB held the event loop up to 89 ms, against 13 ms in steps of 1 MiB."""


def _inflated(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` inflated from ``encoding`` (gzip; deflate, zlib-wrapped or raw), to at most ``limit`` bytes, in steps.

    Not aiohttp's own: it inflated on the event loop, and a gzip body of 64 KB that inflates to 63 MiB held the loop
    0.4 s (found in review). The input is fed a step at a time too: zlib copies what it has not read yet at each
    call, which made 60 MiB of incompressible gzip take 1.3 s in steps of output alone (found in review).
    """
    if not body:
        return body
    if encoding == "gzip":
        wbits = 32 + zlib.MAX_WBITS  # a gzip or a zlib header, told apart as Triton does
    elif body[0] & 0x0F == 8:  # deflate in a zlib wrapper, as HTTP means it
        wbits = zlib.MAX_WBITS
    else:  # raw deflate, which some clients send: aiohttp and browsers take it too
        wbits = -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits=wbits)
    parts, size, view = [], 0, memoryview(body)
    try:
        for start in range(0, len(body), INFLATE_STEP_BYTES):
            pending = view[start : start + INFLATE_STEP_BYTES]
            while pending and size <= limit and not inflater.eof:
                part = inflater.decompress(pending, INFLATE_STEP_BYTES)
                pending = inflater.unconsumed_tail
                parts.append(part)
                size += len(part)
            if size > limit or inflater.eof:
                break
    except zlib.error as exc:
        message = f"the request body does not inflate as {encoding} ({exc})"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, message) from None
    if size > limit:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the request body inflates to over {limit} bytes", status=413)
    if not inflater.eof:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the compressed request body is cut short")
    if inflater.unused_data or start + INFLATE_STEP_BYTES < len(body):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the request body has data after its compressed stream")
    return b"".join(parts)


def _parsed_small(parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)`` of a small body, on the loop; a body it refuses is answered 400 with why."""
    try:
        return parse(*args)
    except InvalidInput as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _model(request: web.Request) -> tuple[str, str]:
    return _path_part(request, "name"), _path_part(request, "version")


def _path_part(request: web.Request, key: str) -> str:
    """A name or version from the path ('' if the route has none), refused unless it is text protobuf can hold.

    aiohttp's C parser keeps bytes that are not UTF-8 percent-encoded, but its Python parser (AIOHTTP_NO_EXTENSIONS)
    turns them into lone surrogates, which protobuf refuses with an exception (found in review).
    """
    part = request.match_info.get(key, "")
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the path's {key} is not valid UTF-8") from None
    return part


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidInput(f"{HEADER_LENGTH} must be a byte count, got {value[:40]!r}")
    return int(value)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps({"error": message}), content_type="application/json", headers=headers
    )
