"""What every RPC shares: the service table and handler wrappers, status mapping, metrics, and ordered streams."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor

from convray.service.config import BatchingSettings
from convray.service.errors import ConvrayError, ModelControlOff, ModelNotReady, Overloaded, status_trailers, to_status
from convray.service.metrics import Metrics
from convray.service.protowire import OverBudget, WireFormatError, count_fields
from convray.workers.repository import ModelLoadError

log = logging.getLogger(__name__)

CALLER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
"""Status codes a request gets for what its caller did or asked (logged at debug, not warning)."""
Request = TypeVar("Request")
Reply = TypeVar("Reply")

CANCELLED_AS_UNAVAILABLE = "convray: the server lost something this call needs"
"""The message a handler is cancelled with when the server ends the call, not its client (``RayGate`` on losing
Ray): the call is answered, and counted, UNAVAILABLE rather than CANCELLED."""
API_LABELS = {"convray.v1.Classifier": "native", "inference.GRPCInferenceService": "oip"}
"""The ``api`` label of the request metrics, by gRPC service: set by each servicer's ``RpcObserver``, and by
``RayGate`` for the calls it refuses before they reach a servicer."""
REST_API_LABEL = "rest"
"""The ``api`` label of the Open Inference Protocol's calls over HTTP/REST (``service.rest``)."""
# Requests of one stream being processed at once; past it, reading the stream waits (backpressure).
STREAM_WINDOW = 256
# Request streams (ClassifyStream, ModelStreamInfer) open at once in one front end; past it a new one is refused
# RESOURCE_EXHAUSTED. An idle stream holds about 20-30 KB: unbounded, 150,000 of them would outgrow a 4 GiB pod.
MAX_OPEN_STREAMS = 10_000
# Label combinations whose metric children each RpcObserver keeps at hand.
CACHED_LABELS = 1024
# Server-side failures of one kind are logged at warning at most this often; the rest at debug, counted.
WARNING_EVERY_S = 10.0


def cancelled_code(cancelled: asyncio.CancelledError, deadline: float | None) -> grpc.StatusCode:
    """The status a cancelled call or stream item is counted under; ``deadline`` as from ``deadline_of``.

    UNAVAILABLE when the server ended it (``CANCELLED_AS_UNAVAILABLE``), DEADLINE_EXCEEDED when its deadline
    (a stream item's: its stream's) had passed, else CANCELLED (its client went away).
    """
    if cancelled.args and cancelled.args[0] == CANCELLED_AS_UNAVAILABLE:
        return grpc.StatusCode.UNAVAILABLE
    passed = deadline is not None and time.monotonic() >= deadline
    return grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() value, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class WarningThrottle:
    """Lets one warning of a kind through every ``interval_s``, and counts those held back meanwhile.

    A server-side failure is usually many calls failing for one reason (Ray lost, a drain, a replica
    restarting, a client polling a starting server): one line per call would flood the log under load, and the
    reason is logged once where it happens. The metrics count every call either way.
    """

    def __init__(self, interval_s: float = WARNING_EVERY_S) -> None:
        self.interval_s = interval_s
        self._next_at: dict[tuple[Any, ...], float] = {}
        self._held: dict[tuple[Any, ...], int] = {}

    def admit(self, kind: tuple[Any, ...]) -> int | None:
        """None if a warning of ``kind`` went out less than ``interval_s`` ago; else how many were held since."""
        now = time.monotonic()
        if now < self._next_at.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._next_at[kind] = now + self.interval_s
        return self._held.pop(kind, 0)


class RpcObserver:
    """Runs RPC handlers so that no exception escapes as UNKNOWN, and counts and times each call."""

    def __init__(
        self, api: str, metrics: Metrics, model_label: Callable[[str], str], warning_every_s: float = WARNING_EVERY_S
    ) -> None:
        """Observe ``api``'s calls (its ``api`` label) into ``metrics``.

        ``model_label`` maps the model a request names ('' for the default) to its metrics label;
        ``warning_every_s``: how often a server-side failure of one kind is logged at warning (``WarningThrottle``).
        """
        self._api = api
        self._metrics = metrics
        self._model_label = model_label
        # Calls in flight by model label, a plain count here that the gauge reads when scraped: an inc and a dec on
        # the gauge itself took 0.66 us a call (two locks), on the loop.
        self._in_flight: dict[str, int] = {}
        # Metric children by label values, looked up once rather than per call (``labels()`` is not
        # cheap next to the rest of a small request); bounded, whatever labels ``model_label`` gives.
        self._requests = functools.lru_cache(maxsize=CACHED_LABELS)(functools.partial(metrics.requests.labels, api))
        self._duration = functools.lru_cache(maxsize=CACHED_LABELS)(
            functools.partial(metrics.request_duration.labels, api)
        )
        self._warnings = WarningThrottle(warning_every_s)

    def _begin(self, model: str) -> str:
        """Count one more request in flight; returns its model label, for ``_record``."""
        model_label = self._model_label(model)
        in_flight = self._in_flight
        if model_label in in_flight:
            in_flight[model_label] += 1
        else:
            in_flight[model_label] = 1
            self._metrics.in_flight_requests.labels(self._api, model_label).set_function(
                functools.partial(in_flight.__getitem__, model_label)
            )
        return model_label

    def _record(
        self, rpc: str, model_label: str, code: grpc.StatusCode, started: float, exc: BaseException | None
    ) -> None:
        self._in_flight[model_label] -= 1
        self._requests(rpc, model_label, code.name).inc()
        if isinstance(exc, Overloaded):
            self._metrics.overload_rejections.labels(self._api, model_label).inc()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._metrics.deadline_expired.labels(self._api, model_label).inc()
        self._duration(rpc, model_label).observe(time.monotonic() - started)

    def _log(self, rpc: str, model_label: str, exc: Exception, code: grpc.StatusCode, message: str) -> None:
        if code in CALLER_CODES or isinstance(exc, ModelControlOff):
            # The caller's own doing, already counted by code in convray_requests_total; at debug so that a
            # client looping on a bad request (or an overload, or model control while it is off) cannot flood
            # the log with one line per call.
            log.debug("%s failed: %s %s", rpc, code.name, message)
        elif code == grpc.StatusCode.UNAVAILABLE:
            # Expected: a lost replica, Ray away, a drain, a server starting; its message says all (no traceback).
            # Once per RPC, model and cause every WARNING_EVERY_S: such calls fail together, for one reason logged
            # where it happens.
            held = self._warnings.admit((rpc, model_label, type(exc)))
            if held is None:
                log.debug("%s failed: %s %s", rpc, code.name, message)
            elif held:
                log.warning("%s failed: %s %s (and %d more like it since the last warning)", rpc, code.name, message,
                            held)  # fmt: skip
            else:
                log.warning("%s failed: %s %s", rpc, code.name, message)
        elif isinstance(exc, ConvrayError | ModelLoadError | TimeoutError | asyncio.TimeoutError):
            log.warning("%s failed: %s %s", rpc, code.name, message)  # a failed model load: each one said
        else:
            log.error("%s failed unexpectedly", rpc, exc_info=exc)

    def refused(self, rpc: str, exc: ConvrayError, model: str = "") -> tuple[grpc.StatusCode, str]:
        """Count and log a call refused before any of its work (a stream past ``MAX_OPEN_STREAMS``); its status."""
        code, message = to_status(exc)
        model_label = self._begin(model)
        self._log(rpc, model_label, exc, code, message)
        self._record(rpc, model_label, code, time.monotonic(), exc)
        return code, message

    async def unary(
        self, rpc: str, model: str, work: Callable[[], Awaitable[Reply]], context: grpc.aio.ServicerContext
    ) -> Reply:
        """Run ``work``; on failure abort the call with the mapped status and a message saying why."""
        started, code, failure = time.monotonic(), grpc.StatusCode.OK, None
        model_label = self._begin(model)
        try:
            return await work()
        except asyncio.CancelledError as cancelled:
            # gRPC cancels the handler when the client goes away or its deadline passes (a queued request then
            # leaves the batcher's queue unrun); the RayGate cancels it when Ray is lost.
            code = cancelled_code(cancelled, deadline_of(context))
            raise
        except Exception as exc:  # noqa: BLE001 (mapped onto a status just below)
            code, message, failure = *to_status(exc), exc
            self._log(rpc, model_label, exc, code, message)
            await context.abort(code, message, status_trailers(exc, code, message))
            raise  # unreachable: abort raises
        finally:
            self._record(rpc, model_label, code, started, failure)

    async def item(
        self, rpc: str, model: str, work: Callable[[], Awaitable[Reply]], deadline: float | None = None
    ) -> Reply | tuple[grpc.StatusCode, str]:
        """Run one stream item's ``work``; a failure is returned as (code, message) so the stream goes on.

        ``deadline`` is the stream's (``deadline_of`` its context): an item cut off past it counts DEADLINE_EXCEEDED.
        """
        started, code, failure = time.monotonic(), grpc.StatusCode.OK, None
        model_label = self._begin(model)
        try:
            return await work()
        except asyncio.CancelledError as cancelled:  # the stream ended under it (client gone, Ray lost)
            code = cancelled_code(cancelled, deadline)
            raise
        except Exception as exc:  # noqa: BLE001 (answered as this item's error)
            code, message, failure = *to_status(exc), exc
            self._log(rpc, model_label, exc, code, message)
            return code, message
        finally:
            self._record(rpc, model_label, code, started, failure)


def stream_budget(batching: BatchingSettings) -> ItemBudget:
    """A new stream's budget: half a model's queue in images, so one stream cannot fill the queue alone."""
    return ItemBudget(max(1, batching.max_queue // 2))


class ItemBudget:
    """Room for ``total`` images in one stream's requests being processed; taking more waits until some finish.

    A stream of large requests (32 images each) would otherwise fill the model's whole queue on its own and get
    RESOURCE_EXHAUSTED for its own items, where waiting to read more is the backpressure a stream should see.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._returned = asyncio.Event()

    async def take(self, count: int) -> int:
        """Wait until ``count`` images fit, take them, and return how many were taken.

        A request larger than the whole budget takes all of it, once the others are done, and goes alone.
        """
        count = min(count, self.total)
        while self.free < count:
            self._returned.clear()
            await self._returned.wait()
        self.free -= count
        return count

    def give_back(self, count: int) -> None:
        """Return images ``take`` gave."""
        self.free += count
        self._returned.set()


DRAINING = "the server is draining"  # the cancel message that tells a drain from the call's own end
CLOSED_FOR_DRAIN = (
    "the server is shutting down: the requests on this stream that got no reply were not processed; send them on a "
    "new stream"
)


class StreamClosedForDrain(ModelNotReady):
    """A request stream the server stopped reading because it is shutting down (UNAVAILABLE: open another)."""


class TooManyStreams(Overloaded):
    """A new request stream past ``MAX_OPEN_STREAMS`` open ones (RESOURCE_EXHAUSTED: retry later or elsewhere)."""


class OpenStreams:
    """The request streams open, at most ``limit`` at once, so that a drain can stop reading them (``stop_reading``).

    A stream only waiting for its client's next request held the drain for its whole grace period, and was
    then cancelled with whatever it had in flight. Stopped instead, it answers what it has read and ends with
    ``StreamClosedForDrain``: every request without a reply was not processed, and can be sent again.
    """

    def __init__(self, limit: int | None = None) -> None:
        """``limit``: streams open at once; ``MAX_OPEN_STREAMS`` unless given."""
        self.closing = False
        self.limit = MAX_OPEN_STREAMS if limit is None else limit
        self.open = 0
        self._waiting: set[asyncio.Task[Any]] = set()  # readers now waiting for their client's next request

    def enter(self) -> None:
        """Count a new stream in; call ``leave`` when it ends.

        Raises:
            TooManyStreams: ``limit`` streams are open already (found in review: 20,000 idle streams, unrefused).
        """
        if self.open >= self.limit:
            raise TooManyStreams(
                f"this server has {self.open} request streams open, its limit; send on an open stream, or retry "
                "later or on another server"
            )
        self.open += 1

    def leave(self) -> None:
        """Count a stream out."""
        self.open -= 1

    async def next_request(self, requests: AsyncIterator[Request]) -> Request:
        """The stream's next request; only this wait is cut short by a drain.

        Raises:
            StopAsyncIteration: the client finished the stream.
            StreamClosedForDrain: the server is draining (before the wait, or during it).
        """
        if self.closing:
            raise StreamClosedForDrain(CLOSED_FOR_DRAIN)
        reader = asyncio.current_task()
        assert reader is not None
        self._waiting.add(reader)
        try:
            return await anext(requests)
        except asyncio.CancelledError as cancelled:
            if cancelled.args != (DRAINING,):  # the call itself ended
                raise
            raise StreamClosedForDrain(CLOSED_FOR_DRAIN) from None
        finally:
            self._waiting.discard(reader)

    def stop_reading(self) -> None:
        """Stop reading every stream: each ends after the replies to the requests it had taken in.

        Only readers waiting for a request are interrupted; one handing a request over (waiting for room in its
        window or budget) finishes that and stops before reading the next. A request gRPC had received just as
        the wait was interrupted is not processed, and gets no reply: the client's rule holds.
        """
        self.closing = True
        for reader in list(self._waiting):
            reader.cancel(DRAINING)


async def ordered_concurrently(
    requests: AsyncIterator[Request],
    handle: Callable[[Request], Awaitable[Reply]],
    budget: ItemBudget | None = None,
    size_of: Callable[[Request], int] | None = None,
    streams: OpenStreams | None = None,
) -> AsyncIterator[Reply]:
    """Handle stream requests concurrently (so they batch together) and yield replies in request order.

    At most ``STREAM_WINDOW`` requests are handled at once and, with a ``budget``, at most its images (a
    request counts ``size_of(request)``, else 1); past either, reading the stream waits.

    Raises:
        StreamClosedForDrain: ``streams.stop_reading()`` was called; after the replies to the requests taken in.
        TooManyStreams: ``streams`` has its limit of streams open; before anything is read.
    """
    in_order: asyncio.Queue[asyncio.Task[Reply] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
    iterator = aiter(requests)

    async def read_requests() -> None:
        try:
            while True:
                try:
                    request = await (anext(iterator) if streams is None else streams.next_request(iterator))
                except StopAsyncIteration:
                    return
                taken = 0 if budget is None else await budget.take(1 if size_of is None else size_of(request))
                task = asyncio.create_task(handle(request))
                if taken:
                    task.add_done_callback(lambda _, taken=taken: budget.give_back(taken))
                try:
                    await in_order.put(task)
                except BaseException:  # the stream ended while the window was full: nobody will await this one
                    task.cancel()
                    raise
        finally:
            await in_order.put(None)

    if streams is not None:
        streams.enter()
    reader = asyncio.create_task(read_requests())  # nothing between here and the try can fail
    try:
        while (task := await in_order.get()) is not None:
            yield await task
        await reader  # surfaces a broken request stream, or a drain
    finally:
        reader.cancel()
        while not in_order.empty():
            if (task := in_order.get_nowait()) is not None:
                task.cancel()
        if streams is not None:
            streams.leave()


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def handler_like(
    template: grpc.RpcMethodHandler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A method handler of the same streaming kind and serialisers as ``template``, running ``behaviour``.

    Interceptors use it to wrap or replace a servicer's handler (``request_deserializer`` overrides the
    template's when given).
    """
    factory = _HANDLER_FACTORIES[(template.request_streaming, template.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=request_deserializer or template.request_deserializer,
        response_serializer=template.response_serializer,
    )


HandlerWrapper = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]
"""Wraps a method's handler (given the method's full name, ``/package.Service/Method``) in behaviour of its own."""


class ServiceTable(grpc.GenericRpcHandler):
    """Every method the server serves, each handler wrapped once as it is added, found by one dict lookup per call.

    The generated ``add_<Service>Servicer_to_server`` functions are given this table in place of the grpc.aio
    server; ``install`` then hands the server the table as its one generic handler. What grpc would do instead
    costs its event loop on every call, and at concurrency 32 that loop is the front end's bottleneck
    (docs/benchmarks.md):

    - Registered methods (the generated functions' second way of adding a service): grpc.aio keeps one pending
      call request per registered method and runs ``asyncio.wait`` over all of them before every call it accepts,
      about 9 us more per call with this server's 21 methods than with none.
    - Interceptors: grpc runs each on every call, as coroutines, to wrap a handler that is the same every time.
      The wrappers (``MalformedMessageGuard``, ``RayGate``) are applied here once per method instead: at a fixed
      2,000 ModelInfer calls a second the event loop's CPU per call fell by 9.5 us on average (four A/B pairs).

    An interceptor that must see each call's metadata before its request is read (``BearerTokenInterceptor``)
    stays an interceptor, outside every wrapper here.
    """

    def __init__(self, wrappers: Sequence[HandlerWrapper] = ()) -> None:
        """``wrappers``, outermost first, are applied to every method's handler as it is added."""
        self._wrappers = list(reversed(wrappers))  # innermost first: the order they are applied in
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._services_added: set[str] = set()  # by either function below
        self._services_named: set[str] = set()  # by add_registered_method_handlers, which carries the handlers

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Note the services: their handlers come again, by name, through ``add_registered_method_handlers``."""
        for handler in handlers:
            service_name = getattr(handler, "service_name", None)
            self._services_added.add(service_name() if service_name else repr(handler))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        """Add a service's methods, each handler wrapped by every wrapper."""
        self._services_added.add(service)
        self._services_named.add(service)
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            for wrap in self._wrappers:
                handler = wrap(method, handler)
            self._handlers[method] = handler

    def install(self, server: grpc.aio.Server) -> None:
        """Serve every method added so far on ``server``.

        Raises:
            RuntimeError: a service came only as a generic handler (code generated by a grpcio-tools older than
                1.63), so its methods are not known by name and would be served unwrapped, or not at all.
        """
        unnamed = self._services_added - self._services_named
        if unnamed:
            raise RuntimeError(f"services added without their methods by name: {sorted(unnamed)}; regenerate their "
                               "gRPC code with grpcio-tools >= 1.63 (make proto)")  # fmt: skip
        server.add_generic_rpc_handlers((self,))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The wrapped handler of the call's method; None (UNIMPLEMENTED) for a method not served."""
        return self._handlers.get(handler_call_details.method)  # type: ignore[arg-type]


SMALL_REQUEST_BYTES = 64 * 1024
"""The largest request of a method that carries no image or tensor (metadata, models, health, repository), and what
an image-carrying request may hold besides its image. Protobuf parses a message whole, on the event loop, holding the
GIL, and a message of tiny repeated fields takes about 40 bytes of memory and 32 ns a byte: 16 MiB of empty OIP
inputs took 0.5 s and 705 MB, at any method that accepted --max-message-bytes (found in review)."""


class _Undecodable:
    """Stands in for a request message that was not parsed, so the handler can refuse it, saying why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


COUNT_FIELDS_PAST_BYTES = 1024 * 1024
"""Requests larger than this have their fields counted before they are parsed (``protowire``). Below it a request
parses in 31-50 ms at worst (1 MiB of empty OIP inputs, idle and loaded), however it is made, about what the count
can take (about 1.5 us a field in Python, up to its budget); and a single 224x224 image, FP32 or UINT8, is not slowed
by a count."""


def _safe(
    deserialize: Callable[[bytes], Any] | None, limit: int, limit_source: str, counted: Descriptor | None = None
) -> Callable[[bytes], Any] | None:
    """``deserialize`` behind the method's size limit and, where ``counted`` is its request type, a field budget.

    The fields of a request over ``COUNT_FIELDS_PAST_BYTES`` are counted before it is parsed. A request failing a
    check becomes an ``_Undecodable``.
    """
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        if len(data) > limit:  # refused unparsed
            return _Undecodable(f"request is {len(data)} bytes, over the {limit} this method takes ({limit_source})")
        if counted is not None and len(data) > COUNT_FIELDS_PAST_BYTES:
            try:
                count_fields(data, counted)
            except WireFormatError as exc:
                return _Undecodable(f"request is not a valid protobuf message: {exc}")
            except OverBudget as exc:
                if exc.packed_integers:
                    advice = "send a tensor's UINT8 or INT values in raw_input_contents, which holds any number"
                else:
                    advice = (
                        "far more than a real one: repeated numbers count as one field when packed (protobuf's "
                        "default), and an OIP tensor's values may go in raw_input_contents"
                    )
                return _Undecodable(f"request holds {exc}; {advice}")
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 (protobuf raises DecodeError and others)
            return _Undecodable(f"request is not a valid protobuf message: {exc}")

    return parse


class _UndecodableInStream(Exception):
    """Ends a request stream at a message that did not parse.

    Raised through the handler, which first answers the requests before it (``ordered_concurrently`` surfaces a
    broken request stream after their replies).
    """

    def __init__(self, request: _Undecodable) -> None:
        super().__init__(request.reason)
        self.request = request


async def _refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


async def replies(outcome: Any) -> AsyncIterator[Any]:
    """The replies of a streaming handler, whether it is an async generator or a coroutine that aborts."""
    if inspect.isasyncgen(outcome):
        async for reply in outcome:
            yield reply
    else:
        await outcome


@dataclass(frozen=True)
class RequestSizes:
    """The largest request message each method takes, checked before it is parsed (see ``SMALL_REQUEST_BYTES``).

    ``large``: methods whose requests carry tensors of several images (OIP inference), which take what grpc takes
    (--max-message-bytes). ``one_image``: methods whose requests carry one encoded image, which take that image's
    limit and ``SMALL_REQUEST_BYTES`` more. Any other method takes ``SMALL_REQUEST_BYTES``.
    """

    max_message_bytes: int
    max_image_bytes: int
    large: frozenset[str]
    one_image: frozenset[str]
    request_types: Mapping[str, Descriptor] = field(hash=False)  # of the large and one-image methods

    def of(self, method: str) -> tuple[int, str]:
        """The limit of ``method`` (its full name, ``/package.Service/Method``), and where it comes from."""
        if method in self.large:
            return self.max_message_bytes, "--max-message-bytes"
        if method in self.one_image:
            limit = min(self.max_image_bytes + SMALL_REQUEST_BYTES, self.max_message_bytes)
            return (
                limit,
                f"an image of at most --max-image-bytes ({self.max_image_bytes}) and {SMALL_REQUEST_BYTES} more",
            )
        return SMALL_REQUEST_BYTES, "its requests hold a few small fields"


class MalformedMessageGuard:
    """Answers requests over their method's size or whose bytes are not a valid message with INVALID_ARGUMENT.

    grpc itself would parse any message up to --max-message-bytes, and answer UNKNOWN to one that does not parse.
    ``wrap`` is a ``HandlerWrapper``: the server applies it to every method once (``ServiceTable``).
    """

    def __init__(self, sizes: RequestSizes) -> None:
        """Resolve the request type of every method whose requests have their fields counted.

        Raises:
            KeyError: a method takes over ``COUNT_FIELDS_PAST_BYTES`` and ``sizes.request_types`` lacks it (its
                requests' fields could not be counted).
        """
        self._sizes = sizes
        self._counted = {}
        for method in sizes.large | sizes.one_image:
            if sizes.of(method)[0] > COUNT_FIELDS_PAST_BYTES:
                if method not in sizes.request_types:
                    raise KeyError(f"no request type given for {method}: its requests' fields could not be counted")
                self._counted[method] = sizes.request_types[method]

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` behind the method's size limit and message checks: undecodable requests are refused first."""
        deserialize = _safe(handler.request_deserializer, *self._sizes.of(method), self._counted.get(method))

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            # Not aborting here: the call would end at once, and replies to the requests before it be lost.
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise _UndecodableInStream(request)
                yield request

        kind = (handler.request_streaming, handler.response_streaming)
        if kind == (False, False):
            behaviour = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                return await behaviour(request, context)

            return handler_like(handler, unary_unary, deserialize)
        if kind == (False, True):
            behaviour = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                async for reply in replies(behaviour(request, context)):
                    yield reply

            return handler_like(handler, unary_stream, deserialize)
        if kind == (True, False):
            behaviour = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(checked(requests), context)
                except _UndecodableInStream as undecodable:
                    await _refuse(context, undecodable.request)

            return handler_like(handler, stream_unary, deserialize)
        behaviour = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for reply in replies(behaviour(checked(requests), context)):
                    yield reply
            except _UndecodableInStream as undecodable:
                await _refuse(context, undecodable.request)

        return handler_like(handler, stream_stream, deserialize)
