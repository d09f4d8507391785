"""service.rpc: the pieces every RPC shares (the service table and its wrappers, metric children, streams)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client import CollectorRegistry

from convray.oip import inference_pb2_grpc
from convray.service.errors import InvalidInput, ModelControlOff, ModelNotReady
from convray.service.metrics import Metrics
from convray.service.rpc import (
    API_LABELS,
    CANCELLED_AS_UNAVAILABLE,
    STREAM_WINDOW,
    ItemBudget,
    OpenStreams,
    RpcObserver,
    ServiceTable,
    StreamClosedForDrain,
    TooManyStreams,
    ordered_concurrently,
)
from convray.v1 import classifier_pb2_grpc
from convray.workers.repository import ModelLoadError


async def _echo(request: object, context: object) -> object:
    return request


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method, self.invocation_metadata = method, ()


def _tagging(tag: str, log: list[str]):
    """A wrapper that notes each method it wraps and marks the handler it returns with ``tag``."""

    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        log.append(f"{tag} {method}")

        async def tagged(request: object, context: object) -> object:
            return [tag, *await handler.unary_unary(request, context)]

        return grpc.unary_unary_rpc_method_handler(tagged)

    return wrap


async def test_each_method_is_wrapped_once_as_it_is_added_and_found_by_its_full_name():
    wrapped: list[str] = []
    table = ServiceTable([_tagging("outer", wrapped), _tagging("inner", wrapped)])

    async def servicer_reply(request: object, context: object) -> list[str]:
        return ["servicer"]

    table.add_registered_method_handlers("pkg.Svc", {"Call": grpc.unary_unary_rpc_method_handler(servicer_reply)})

    assert wrapped == ["inner /pkg.Svc/Call", "outer /pkg.Svc/Call"]
    handler = table.service(_CallDetails("/pkg.Svc/Call"))
    assert await handler.unary_unary(None, None) == ["outer", "inner", "servicer"]
    assert await handler.unary_unary(None, None) == ["outer", "inner", "servicer"]
    assert table.service(_CallDetails("/pkg.Svc/Other")) is None  # grpc answers UNIMPLEMENTED
    assert wrapped == ["inner /pkg.Svc/Call", "outer /pkg.Svc/Call"]  # not again, however many calls


class _RecordingServer:
    """Records the generic handlers a server is given."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.generic.extend(handlers)


def test_generated_services_reach_the_server_as_the_one_table_and_never_as_registered_methods():
    table, server = ServiceTable(), _RecordingServer()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference_pb2_grpc.GRPCInferenceServiceServicer(),
                                                                  table)  # fmt: skip
    classifier_pb2_grpc.add_ClassifierServicer_to_server(classifier_pb2_grpc.ClassifierServicer(), table)

    table.install(server)  # type: ignore[arg-type]

    # A server given registered methods would wait on one pending call per method before every call it accepts.
    assert server.generic == [table]
    assert table.service(_CallDetails("/inference.GRPCInferenceService/ModelInfer")) is not None
    assert table.service(_CallDetails("/convray.v1.Classifier/Classify")) is not None


def test_a_service_added_only_as_a_generic_handler_is_refused_at_install_not_served_unwrapped():
    table = ServiceTable()
    # What a grpcio-tools older than 1.63 generates: the generic handler alone, its methods not given by name.
    table.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("old.Svc", {"Call": grpc.unary_unary_rpc_method_handler(_echo)}),)
    )
    with pytest.raises(RuntimeError, match=r"old\.Svc.*make proto"):
        table.install(_RecordingServer())  # type: ignore[arg-type]


async def test_the_observer_counts_each_call_under_its_code_with_cached_metric_children():
    registry = CollectorRegistry()
    observer = RpcObserver("oip", Metrics(registry), lambda name: name or "digits")

    async def ok() -> str:
        return "ok"

    for _ in range(3):
        assert await observer.item("ModelInfer", "", ok) == "ok"
    code, _ = await observer.item("ModelInfer", "digits", _fails)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"api": "oip", "model": "digits", **labels})

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sample("convray_requests_total", rpc="ModelInfer", code="OK") == 3
    assert sample("convray_requests_total", rpc="ModelInfer", code="INVALID_ARGUMENT") == 1
    assert sample("convray_request_duration_seconds_count", rpc="ModelInfer") == 4
    assert sample("convray_in_flight_requests") == 0


async def _fails() -> str:
    raise InvalidInput("bad pixels")


async def test_a_callers_error_is_logged_at_debug_and_a_server_side_one_at_warning(caplog):
    """One log line per bad request at warning would let a looping client flood the log; the metrics count it."""
    observer = RpcObserver("oip", Metrics(CollectorRegistry()), lambda name: name)

    async def not_ready() -> str:
        raise ModelNotReady("draining")

    async def timed_out_inside() -> str:
        raise TimeoutError("GCS did not answer")

    async def model_control_off() -> str:  # a client calling RepositoryModelLoad in a loop: its doing too
        raise ModelControlOff("model control is off")

    with caplog.at_level(logging.DEBUG, logger="convray.service.rpc"):
        await observer.item("ModelInfer", "digits", _fails)
        await observer.item("ModelInfer", "digits", not_ready)
        await observer.item("ModelInfer", "digits", timed_out_inside)
        await observer.item("RepositoryModelLoad", "digits", model_control_off)

    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels == {
        "ModelInfer failed: INVALID_ARGUMENT bad pixels": logging.DEBUG,
        "RepositoryModelLoad failed: FAILED_PRECONDITION model control is off": logging.DEBUG,
        "ModelInfer failed: UNAVAILABLE draining": logging.WARNING,
        # a wait inside the server: a warning saying so, not an error with a traceback
        "ModelInfer failed: UNAVAILABLE timed out inside the server (TimeoutError: GCS did not answer); retry": (
            logging.WARNING
        ),
    }


async def test_many_calls_failing_for_one_server_side_reason_give_one_warning_then_one_saying_how_many_followed(
    caplog,
):
    """Ray lost under load, or a client polling a starting server: one warning per call flooded the log."""
    observer = RpcObserver("oip", Metrics(CollectorRegistry()), lambda name: name, warning_every_s=1.0)

    async def starting() -> str:
        raise ModelNotReady("server is starting")

    async def timed_out_inside() -> str:
        raise TimeoutError("GCS did not answer")

    async def load_fails(model: str) -> str:
        raise ModelLoadError(f"{model}: bad weights")

    with caplog.at_level(logging.DEBUG, logger="convray.service.rpc"):
        for _ in range(50):
            await observer.item("ModelInfer", "digits", starting)
        await observer.item("ModelInfer", "digits", timed_out_inside)  # another kind: a warning of its own
        await observer.item("ModelMetadata", "digits", starting)  # another RPC too
        await observer.item("ModelInfer", "cats", starting)  # and another model
        for model in ("alpha", "beta"):  # a load failing is not throttled: each one is said
            await observer.item("RepositoryModelLoad", model, lambda model=model: load_fails(model))
        await asyncio.sleep(1.05)
        await observer.item("ModelInfer", "digits", starting)

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        "ModelInfer failed: UNAVAILABLE server is starting",
        "ModelInfer failed: UNAVAILABLE timed out inside the server (TimeoutError: GCS did not answer); retry",
        "ModelMetadata failed: UNAVAILABLE server is starting",
        "ModelInfer failed: UNAVAILABLE server is starting",
        "RepositoryModelLoad failed: FAILED_PRECONDITION model load failed: alpha: bad weights",
        "RepositoryModelLoad failed: FAILED_PRECONDITION model load failed: beta: bad weights",
        "ModelInfer failed: UNAVAILABLE server is starting (and 49 more like it since the last warning)",
    ]
    held_back = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert len(held_back) == 49  # still there at debug


class _Context:
    """The one thing ``RpcObserver.unary`` asks of a cancelled call's context."""

    def __init__(self, time_remaining: float | None) -> None:
        self._remaining = time_remaining

    def time_remaining(self) -> float | None:
        return self._remaining


async def _cancelled_midway(start: Callable[[Callable[[], Awaitable[str]]], Awaitable[object]], message=None):
    """Start a call whose work waits forever, cancel it (with ``message``) once the work runs, see it end."""
    started = asyncio.Event()

    async def waits() -> str:
        started.set()
        await asyncio.sleep(60)
        return "never"

    call = asyncio.create_task(start(waits))
    await started.wait()
    call.cancel(msg=message)
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize(
    "message,remaining,code",
    [
        (CANCELLED_AS_UNAVAILABLE, 10.0, "UNAVAILABLE"),  # the RayGate failing it: Ray was lost
        (None, 10.0, "CANCELLED"),  # its client went away
        (None, 0.0, "DEADLINE_EXCEEDED"),  # gRPC cancelled it at its deadline
    ],
)
async def test_a_cancelled_call_is_counted_under_who_ended_it(message, remaining, code):
    registry = CollectorRegistry()
    observer = RpcObserver("native", Metrics(registry), lambda name: name)
    await _cancelled_midway(lambda work: observer.unary("Classify", "digits", work, _Context(remaining)), message)

    labels = {"api": "native", "rpc": "Classify", "model": "digits"}
    assert registry.get_sample_value("convray_requests_total", {**labels, "code": code}) == 1
    assert registry.get_sample_value("convray_requests_total", {**labels, "code": "OK"}) is None


@pytest.mark.parametrize(
    "stream_deadline_in_s,code",
    [(None, "CANCELLED"), (10.0, "CANCELLED"), (-0.001, "DEADLINE_EXCEEDED")],
    ids=["no deadline", "before its deadline", "at its deadline"],
)
async def test_a_stream_item_cut_off_by_its_stream_ending_is_counted_cancelled_or_past_its_deadline(
    stream_deadline_in_s, code
):
    registry = CollectorRegistry()
    observer = RpcObserver("oip", Metrics(registry), lambda name: name)
    deadline = None if stream_deadline_in_s is None else time.monotonic() + stream_deadline_in_s
    await _cancelled_midway(lambda work: observer.item("ModelStreamInfer", "digits", work, deadline))

    labels = {"api": "oip", "rpc": "ModelStreamInfer", "model": "digits"}
    assert registry.get_sample_value("convray_requests_total", {**labels, "code": code}) == 1
    assert registry.get_sample_value("convray_deadline_expired_total", {"api": "oip", "model": "digits"}) == (
        1 if code == "DEADLINE_EXCEEDED" else None
    )
    assert registry.get_sample_value("convray_requests_total", {**labels, "code": "OK"}) is None


async def test_no_stream_item_runs_on_after_its_stream_ends_with_the_window_full():
    """The client goes away while every place in the window is taken and the next item is being read."""
    started, finished = [], []

    async def requests():
        for i in range(STREAM_WINDOW + 5):
            yield i

    async def handle(i: int) -> int:
        started.append(i)
        await asyncio.sleep(0.2)
        finished.append(i)
        return i

    replies = ordered_concurrently(requests(), handle)
    first = asyncio.ensure_future(replies.__anext__())
    await asyncio.sleep(0.05)  # the window is full and one more item has started
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await replies.aclose()
    await asyncio.sleep(0.4)
    # one item awaited for the first reply, a full window behind it, and one more waiting for a place
    assert len(started) == STREAM_WINDOW + 2 and finished == []


async def test_a_stream_with_a_budget_handles_only_as_many_images_at_once_as_it_allows_and_keeps_the_order():
    """Sizes 3 in a budget of 7: two requests at a time. The one of 10, larger than the whole budget, goes alone."""
    sizes = [3, 3, 3, 3, 10, 3, 3]
    processing, most_at_once = [], []

    async def requests():
        for i, size in enumerate(sizes):
            yield (i, size)

    async def handle(request: tuple[int, int]) -> int:
        processing.append(request[1])
        most_at_once.append(sum(processing))
        await asyncio.sleep(0.02)
        processing.remove(request[1])
        return request[0]

    budget = ItemBudget(7)
    replies = [r async for r in ordered_concurrently(requests(), handle, budget, lambda request: request[1])]
    assert replies == list(range(len(sizes)))
    assert max(most_at_once) == 10 and sorted(set(most_at_once)) == [3, 6, 10]
    await asyncio.sleep(0)  # the last request's images come back as its task's done callback runs
    assert budget.free == 7


async def test_a_drain_stops_reading_a_stream_that_ends_after_answering_what_it_read():
    """Found in review: a stream waiting for its client's next request held the drain for its whole grace period,
    then was cancelled with whatever it had in flight."""
    sent, waiting_for_more = asyncio.Queue(), asyncio.Event()

    async def requests():
        while True:
            if sent.empty():
                waiting_for_more.set()
            yield await sent.get()

    async def handle(i: int) -> int:
        await asyncio.sleep(0.1)  # still in flight when the drain begins
        return i

    streams = OpenStreams()
    replies = ordered_concurrently(requests(), handle, streams=streams)
    for i in range(3):
        sent.put_nowait(i)
    first = await replies.__anext__()
    await waiting_for_more.wait()  # the three read, the client silent
    streams.stop_reading()
    rest = []
    with pytest.raises(StreamClosedForDrain, match="requests on this stream that got no reply were not processed"):
        async for reply in replies:
            rest.append(reply)
    assert [first, *rest] == [0, 1, 2]


async def test_a_stream_whose_reading_has_not_begun_when_the_drain_comes_ends_at_once():
    """Found in review: a drain landing before the reader's first step left the stream waiting for ever."""

    async def requests():
        yield 1

    async def handle(i: int) -> int:
        return i

    streams = OpenStreams()
    replies = ordered_concurrently(requests(), handle, streams=streams)
    first = asyncio.ensure_future(replies.__anext__())
    await asyncio.sleep(0)  # the generator has started its reader, which has not run yet
    streams.stop_reading()
    with pytest.raises(StreamClosedForDrain):
        await asyncio.wait_for(first, 2)


async def test_a_request_read_while_waiting_for_room_is_answered_before_the_stream_ends():
    """Found in review: a drain cancelled the reader wherever it was, so a request it had read but not yet handed
    over (waiting for the stream's image budget) was dropped."""
    release, second_read = asyncio.Event(), asyncio.Event()

    async def requests():
        yield (0, 2)
        second_read.set()
        yield (1, 2)  # needs the room the first holds
        await asyncio.Event().wait()  # then the client is silent

    async def handle(request: tuple[int, int]) -> int:
        if request[0] == 0:
            await release.wait()
        return request[0]

    streams = OpenStreams()
    replies = ordered_concurrently(requests(), handle, ItemBudget(2), lambda request: request[1], streams)
    first = asyncio.ensure_future(replies.__anext__())
    await second_read.wait()
    await asyncio.sleep(0.01)  # the reader waits for room for the second
    streams.stop_reading()
    release.set()
    answered = [await first]
    with pytest.raises(StreamClosedForDrain):
        async for reply in replies:
            answered.append(reply)
    assert answered == [0, 1]


async def test_without_a_drain_a_stream_is_read_to_its_end():
    async def requests():
        for i in range(3):
            yield i

    async def handle(i: int) -> int:
        return i

    assert [r async for r in ordered_concurrently(requests(), handle, streams=OpenStreams())] == [0, 1, 2]


async def test_past_its_limit_of_open_streams_a_new_one_is_refused_resource_exhausted_until_one_ends():
    """Found in review: 20,000 idle streams were all taken, at about 20-30 KB each, and none refused."""

    async def silent():
        await asyncio.Event().wait()
        yield 0

    async def handle(i: int) -> int:
        return i

    streams = OpenStreams(limit=2)
    open_ones = [ordered_concurrently(silent(), handle, streams=streams) for _ in range(2)]
    waiting = [asyncio.ensure_future(stream.__anext__()) for stream in open_ones]
    await asyncio.sleep(0.01)
    assert streams.open == 2
    with pytest.raises(TooManyStreams, match="has 2 request streams open, its limit") as refused:
        await ordered_concurrently(silent(), handle, streams=streams).__anext__()
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    waiting[0].cancel()  # its client went away
    with contextlib.suppress(asyncio.CancelledError):
        await waiting[0]
    await open_ones[0].aclose()
    assert streams.open == 1
    admitted = ordered_concurrently(silent(), handle, streams=streams)
    third = asyncio.ensure_future(admitted.__anext__())
    await asyncio.sleep(0.01)
    assert streams.open == 2 and not third.done()
    for task in (third, waiting[1]):
        task.cancel()
    await asyncio.gather(third, waiting[1], return_exceptions=True)


def test_the_api_labels_name_the_services_convray_serves():
    from convray.service.server import CLASSIFIER_SERVICE, OIP_SERVICE

    assert API_LABELS == {CLASSIFIER_SERVICE: "native", OIP_SERVICE: "oip"}


def test_a_stream_refused_for_the_open_stream_limit_is_counted_as_an_overload():
    """Found in review: refused outside the observer, it was in no metric, so the overload alert could not see it."""
    registry = CollectorRegistry()
    observer = RpcObserver("native", Metrics(registry), lambda name: name or "digits")
    code, message = observer.refused("ClassifyStream", TooManyStreams("this server has 2 request streams open"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message == "this server has 2 request streams open"
    labels = {"api": "native", "model": "digits"}
    assert (
        registry.get_sample_value(
            "convray_requests_total", {**labels, "rpc": "ClassifyStream", "code": "RESOURCE_EXHAUSTED"}
        )
        == 1
    )
    assert registry.get_sample_value("convray_overload_rejections_total", labels) == 1
    assert registry.get_sample_value("convray_in_flight_requests", labels) == 0
