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


def classify_stream_code(reply: bytes) -> str:
    """The status code name of one ``ClassifyStreamResponse``: "OK", or its error's code."""
    from convray.v1 import classifier_pb2 as pb

    response = pb.ClassifyStreamResponse.FromString(reply)
    return (response.error.code or "UNKNOWN") if response.WhichOneof("outcome") == "error" else "OK"


def model_stream_infer_code(reply: bytes) -> str:
    """The status code name of one ``ModelStreamInferResponse``: "OK", or the one its error message starts with.

    convray writes the code as "[INVALID_ARGUMENT] message"; an error in another form (another server's) is UNKNOWN.
    """
    from convray.oip import inference_pb2 as oip

    error = oip.ModelStreamInferResponse.FromString(reply).error_message
    if not error:
        return "OK"
    name = error[1 : error.find("]")] if error.startswith("[") else ""
    return name if name in grpc.StatusCode.__members__ else "UNKNOWN"


class StreamCaller:
    """Sends serialised requests over one stream of ``method``; each call returns its reply's status code name.

    The stream opens on the first call and again after it broke. A request unanswered after its timeout counts as
    DEADLINE_EXCEEDED and cancels the stream: every later reply on it would be matched to the wrong request.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        method: str,
        code_of: Callable[[bytes], str],
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``metadata``: sent with each stream it opens (a bearer token)."""
        self._multicallable = channel.stream_stream(method)  # bytes in, bytes out
        self._metadata = metadata or None
        self._code_of = code_of
        self._call: grpc.aio.StreamStreamCall | None = None
        self._waiting: deque[asyncio.Future[str]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # a gRPC stream takes one write at a time; it also keeps the FIFO in order
        self._reset: set[grpc.aio.StreamStreamCall] = set()  # streams this client cancelled after a timeout

    async def __call__(self, payload: bytes, timeout_s: float) -> str:
        """Send one request and wait for its reply; its status code name."""
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
            return "DEADLINE_EXCEEDED"

    async def _read(self, call: grpc.aio.StreamStreamCall, waiting: deque[asyncio.Future[str]]) -> None:
        """Answer the waiting requests in order from the stream's replies; when it ends, answer the rest."""
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                if not waiting:  # more replies than requests: nothing on this stream can be matched any more
                    call.cancel()
                    break
                future = waiting.popleft()
                if not future.done():
                    future.set_result(self._status_of(reply))
            code = (await call.code()).name
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
        if call in self._reset:  # not the server's doing: this client gave the stream up
            self._reset.discard(call)
            code = CLIENT_RESET
        if self._call is call:
            self._call = None
        for future in waiting:
            if not future.done():
                future.set_result("UNKNOWN" if code == "OK" else code)  # a stream that ended leaving them unanswered

    def _status_of(self, reply: bytes) -> str:
        try:
            return self._code_of(reply)
        except Exception:  # noqa: BLE001 (not the reply message this API defines: another server's, or garbled)
            return "UNKNOWN"

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
