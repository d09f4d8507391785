"""convray bench --streaming: replies matched to requests by order, item errors read, broken and stuck streams."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from convray.oip import inference_pb2 as oip
from convray.service.bench_stream import (
    CLIENT_RESET,
    Outcome,
    StreamCaller,
    classify_stream_outcome,
    model_stream_infer_outcome,
)
from convray.v1 import classifier_pb2 as pb

METHOD = "/test.Scripted/Stream"


def test_a_classify_stream_reply_gives_its_error_code_and_message():
    ok = pb.ClassifyStreamResponse(result=pb.ClassifyResponse(model="digits"))
    failed = pb.ClassifyStreamResponse(error=pb.Error(code="NOT_FOUND", message="no model 'nope'"))
    assert classify_stream_outcome(ok.SerializeToString()) == ("OK", "")
    assert classify_stream_outcome(failed.SerializeToString()) == ("NOT_FOUND", "no model 'nope'")


@pytest.mark.parametrize(
    ("error_message", "outcome"),
    [
        ("", ("OK", "")),
        (
            "[RESOURCE_EXHAUSTED] the queue of 'digits' is full",
            ("RESOURCE_EXHAUSTED", "the queue of 'digits' is full"),
        ),
        ("[NOT_A_CODE] something", ("UNKNOWN", "[NOT_A_CODE] something")),
        ("in some other server's words", ("UNKNOWN", "in some other server's words")),
    ],
)
def test_a_model_stream_infer_reply_gives_the_code_its_error_starts_with_and_the_rest_as_message(
    error_message, outcome
):
    reply = oip.ModelStreamInferResponse(error_message=error_message, infer_response=oip.ModelInferResponse())
    assert model_stream_infer_outcome(reply.SerializeToString()) == outcome


class ScriptedServer:
    """A real gRPC server whose stream echoes each item back, in order, except:
    b"break next" makes the item after it end the stream with UNAVAILABLE, b"hang" is never answered,
    b"twice" is answered twice, and after b"stay open" the stream stays open when the client half-closes it.

    (The break waits for the next item so that no write follows it: a write racing the stream's end can
    turn its status into grpc's own INTERNAL "Failed execute_batch".)
    """

    def __init__(self) -> None:
        self.streams_opened = 0
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self._stream)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Scripted", {"Stream": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.streams_opened += 1
        breaking = staying = False
        async for item in requests:
            staying = staying or item == b"stay open"
            if breaking:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            breaking = item == b"break next"
            if item == b"hang":
                await asyncio.Event().wait()
            yield item
            if item == b"twice":
                yield item
        if staying:
            await asyncio.Event().wait()

    async def __aenter__(self) -> "ScriptedServer":
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


def echoed(reply: bytes) -> Outcome:
    """The 'status' of a reply from the scripted server: what it echoed."""
    return reply.decode(), ""


class CodesOnly:
    """A StreamCaller whose calls give only the code of their outcome, which is what most tests here look at."""

    def __init__(self, caller: StreamCaller) -> None:
        self.caller = caller

    async def __call__(self, payload: bytes, timeout_s: float) -> str:
        code, _ = await self.caller(payload, timeout_s)
        return code

    async def close(self, timeout_s: float = 30.0) -> None:
        await self.caller.close(timeout_s)


@contextlib.asynccontextmanager
async def caller_on_a_scripted_server() -> AsyncIterator[tuple[ScriptedServer, CodesOnly]]:
    async with ScriptedServer() as scripted, grpc.aio.insecure_channel(f"127.0.0.1:{scripted.port}") as channel:
        yield scripted, CodesOnly(StreamCaller(channel, METHOD, echoed))


async def test_a_failed_request_says_why_a_broken_stream_with_its_details_a_timeout_with_the_limit():
    """Found in review: bench reported each error code's first message for unary calls only."""
    async with caller_on_a_scripted_server() as (scripted, codes_only):
        caller = codes_only.caller
        broken = await asyncio.gather(caller(b"break next", timeout_s=5), caller(b"waiting", timeout_s=5))
        assert broken == [("break next", ""), ("UNAVAILABLE", "going away")]
        assert await caller(b"hang", timeout_s=0.3) == ("DEADLINE_EXCEEDED", "no reply within --timeout 0.3 s")
        await caller.close()


async def test_concurrent_requests_on_one_stream_each_get_their_own_reply():
    async with caller_on_a_scripted_server() as (scripted, caller):
        replies = await asyncio.gather(*(caller(f"item {i}".encode(), timeout_s=5) for i in range(20)))
        await caller.close()
    assert replies == [f"item {i}" for i in range(20)]
    assert scripted.streams_opened == 1


async def test_a_broken_stream_fails_its_waiting_requests_with_its_status_and_the_next_request_opens_another():
    async with caller_on_a_scripted_server() as (scripted, caller):
        assert await caller(b"first", timeout_s=5) == "first"
        answers = await asyncio.gather(caller(b"break next", timeout_s=5), caller(b"waiting", timeout_s=5))
        assert answers == ["break next", "UNAVAILABLE"]
        assert await caller(b"after", timeout_s=5) == "after"
        await caller.close()
    assert scripted.streams_opened == 2


async def test_an_unanswered_request_times_out_and_its_stream_is_replaced():
    async with caller_on_a_scripted_server() as (scripted, caller):
        assert await caller(b"hang", timeout_s=0.3) == "DEADLINE_EXCEEDED"
        # A reply that came late on the old stream would have been matched to the wrong request.
        assert await caller(b"next", timeout_s=5) == "next"
        await caller.close()
    assert scripted.streams_opened == 2


async def test_closing_waits_for_the_replies_still_on_their_way():
    async with caller_on_a_scripted_server() as (scripted, caller):
        pending = [asyncio.create_task(caller(f"{i}".encode(), timeout_s=5)) for i in range(5)]
        await asyncio.sleep(0)  # every request written
        await caller.close()
        assert all(task.done() for task in pending)
        assert [task.result() for task in pending] == [f"{i}" for i in range(5)]
    assert scripted.streams_opened == 1


async def test_a_reply_no_request_waits_for_ends_the_stream_and_the_next_request_opens_another():
    """A server answering an item twice (one that breaks the stream contract) cannot be matched any more.

    Only a reply arriving while nothing waits can be told apart; one arriving after the next request was sent
    would be taken for its answer, which no client can tell.
    """
    async with caller_on_a_scripted_server() as (scripted, caller):
        assert await caller(b"twice", timeout_s=5) == "twice"
        await asyncio.sleep(0.1)  # the second answer arrives with nothing waiting
        assert await caller(b"next", timeout_s=5) == "next"
        await caller.close()
    assert scripted.streams_opened == 2


async def test_a_reply_that_is_not_the_apis_message_counts_as_unknown():
    async with caller_on_a_scripted_server() as (scripted, caller):
        assert await caller(b"\xff not utf-8", timeout_s=5) == "UNKNOWN"  # what `echoed` cannot read
        assert await caller(b"next", timeout_s=5) == "next"
        await caller.close()


async def test_requests_behind_a_timed_out_one_count_as_the_clients_reset_not_as_cancelled_by_the_server():
    """Found in review: a timeout on a stream made every request still waiting on it count CANCELLED, as if the
    server had cancelled them (190 of 200 in its run)."""
    async with caller_on_a_scripted_server() as (scripted, caller):
        answers = await asyncio.gather(caller(b"hang", timeout_s=0.3), caller(b"behind it", timeout_s=5))
        await caller.close()
    assert answers == ["DEADLINE_EXCEEDED", CLIENT_RESET]


async def test_closing_a_stream_the_server_keeps_open_gives_up_after_the_timeout():
    """Found in review: the run hung at its end, and its report was lost."""
    async with caller_on_a_scripted_server() as (scripted, caller):
        assert await caller(b"stay open", timeout_s=5) == "stay open"
        await asyncio.wait_for(caller.close(timeout_s=0.5), 5)
