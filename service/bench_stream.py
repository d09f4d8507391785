"""``convray bench --streaming``: requests sent over one bidirectional stream, replies matched by order.

convray answers ``ClassifyStream`` and ``ModelStreamInfer`` items in the order they were sent (so does
Triton), so a FIFO of waiting futures pairs each reply with its request. Items fail inside the stream,
with the status a unary call would have had; a broken stream fails every request waiting on it with the
stream's own status, and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import grpc

CLASSIFY_STREAM = "/convray.v1.Classifier/ClassifyStream"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
CLIENT_RESET = "CLIENT_RESET_STREAM"
"""Not a gRPC code: the requests still waiting on a stream this client cancelled because another on it timed out."""


Outcome = tuple[str, str]
"""A request's status code name ("OK" or a gRPC code's) and the server's message ("" when it succeeded)."""


def classify_stream_outcome(reply: bytes) -> Outcome:
    """The outcome of one ``ClassifyStreamResponse``: "OK", or its error's code and message."""
    from convray.v1 import classifier_pb2 as pb

    response = pb.ClassifyStreamResponse.FromString(reply)
    if response.WhichOneof("outcome") != "error":
        return "OK", ""
    return response.error.code or "UNKNOWN", response.error.message


def model_stream_infer_outcome(reply: bytes) -> Outcome:
    """The outcome of one ``ModelStreamInferResponse``: "OK", or the code its error message starts with.

    convray writes the error as "[INVALID_ARGUMENT] message"; an error in another form (another server's) is UNKNOWN,
    with the whole text as its message.
    """
    from convray.oip import inference_pb2 as oip

    error = oip.ModelStreamInferResponse.FromString(reply).error_message
    if not error:
        return "OK", ""
    name, bracket, message = error[1:].partition("] ") if error.startswith("[") else ("", "", error)
    if not bracket or name not in grpc.StatusCode.__members__:
        return "UNKNOWN", error
    return name, message


class StreamCaller:
    """Sends serialised requests over one stream of ``method``; each call returns its reply's status code name.

    The stream opens on the first call and again after it broke. A request unanswered after its timeout counts as
    DEADLINE_EXCEEDED and cancels the stream: every later reply on it would be matched to the wrong request.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        method: str,
        outcome_of: Callable[[bytes], Outcome],
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``metadata``: sent with each stream it opens (a bearer token)."""
        self._multicallable = channel.stream_stream(method)  # bytes in, bytes out
        self._metadata = metadata or None
        self._outcome_of = outcome_of
        self._call: grpc.aio.StreamStreamCall | None = None
        self._waiting: deque[asyncio.Future[Outcome]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # a gRPC stream takes one write at a time; it also keeps the FIFO in order
        self._reset: set[grpc.aio.StreamStreamCall] = set()  # streams this client cancelled after a timeout

    async def __call__(self, payload: bytes, timeout_s: float) -> Outcome:
        """Send one request and wait for its reply's outcome."""
        reply = asyncio.get_running_loop().create_future()
        async with self._writing:
            if self._call is None:
                self._call, self._waiting = self._multicallable(metadata=self._metadata), deque()
                self._reader = asyncio.create_task(self._read(self._call, self._waiting))
            call = self._call
            self._waiting.append(reply)
            try:
                await call.write(payload)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream has ended: the reader answers this request with the stream's status
        try:
            return await asyncio.wait_for(reply, timeout_s)  # cancelled on a timeout: the reader then skips it
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            if self._call is call:
                self._call = None
            self._reset.add(call)
            call.cancel()
            return "DEADLINE_EXCEEDED", f"no reply within --timeout {timeout_s:g} s"

    async def _read(self, call: grpc.aio.StreamStreamCall, waiting: deque[asyncio.Future[Outcome]]) -> None:
        """Answer the waiting requests in order from the stream's replies; when it ends, answer the rest."""
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                if not waiting:  # more replies than requests: nothing on this stream can be matched any more
                    call.cancel()
                    break
                future = waiting.popleft()
                if not future.done():
                    future.set_result(self._outcome(reply))
            code, message = (await call.code()).name, await call.details()
        except grpc.aio.AioRpcError as exc:
            code, message = exc.code().name, exc.details() or ""
        except asyncio.CancelledError:
            code, message = "CANCELLED", "the stream was cancelled"
        if call in self._reset:  # not the server's doing: this client gave the stream up
            self._reset.discard(call)
            code, message = CLIENT_RESET, "another request on its stream timed out, and the client reset the stream"
        if self._call is call:
            self._call = None
        if code == "OK":
            code, message = "UNKNOWN", "the stream ended before answering this request"
        for future in waiting:
            if not future.done():
                future.set_result((code, message))

    def _outcome(self, reply: bytes) -> Outcome:
        try:
            return self._outcome_of(reply)
        except Exception as exc:  # noqa: BLE001 (not the reply message this API defines: another server's, or garbled)
            return "UNKNOWN", f"an unreadable stream reply: {exc}"

    async def close(self, timeout_s: float = 30.0) -> None:
        """Finish the stream: half-close it after the requests being written, and wait for every reply.

        A server that keeps the stream open after that gets ``timeout_s``, then the stream is cancelled.
        """
        async with self._writing:
            call, reader = self._call, self._reader
            if call is None or reader is None:
                return
            try:
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
        try:
            await asyncio.wait_for(asyncio.shield(reader), timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            call.cancel()
            await reader
