"""convray's exceptions and the one mapping of any exception onto a gRPC status code.

Handlers never let an exception escape: grpc would turn it into UNKNOWN, which tells a client nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from convray.workers.repository import ModelLoadError


class ConvrayError(Exception):
    """An expected failure with the gRPC status it should produce."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ConvrayError):
    """The request is malformed: bad image bytes, a bad field value or a size over a limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ConvrayError):
    """The named model, or version of it, is not in the repository or not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ConvrayError):
    """The server is starting, draining, or the model's replicas are unavailable; the call can be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ConvrayError):
    """The model's queue is full; the client should back off and retry, after ``retry_after_s`` when given."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelControlOff(ConvrayError):
    """Loading or unloading models on request is not possible in this server's set-up; the message says why."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExpired(ConvrayError):
    """The client's deadline passed while the request waited; it was dropped before any compute."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""HTTP status by gRPC code, as google/rpc/code.proto maps them; any other code is 500."""


MAX_MESSAGE_CHARS = 1000
"""The longest status message sent. Messages repeat what the client sent (names, datatypes, parameter keys), and
gRPC ends a call whose status is over its metadata limit (16 KiB) with RESOURCE_EXHAUSTED, which clients take for
overload and retry."""


MAX_REQUEST_ID_CHARS = 1024
"""The longest request id (native ``request_id``, OIP ``id``) accepted. Replies echo it, a stream's twice: a 64 MiB
id made the reply too large to send, and grpc ended the stream RESOURCE_EXHAUSTED, losing the items after it."""


def echoed(text: str) -> str:
    """What an error reply echoes of a client's string (an id, a model name): itself, or nothing if it is too long.

    Too long is over ``MAX_REQUEST_ID_CHARS``: such an id is refused by ``check_request_id``, and no model has
    such a name.
    """
    return text if len(text) <= MAX_REQUEST_ID_CHARS else ""


def check_request_id(request_id: str, field: str) -> None:
    """Refuse an id over ``MAX_REQUEST_ID_CHARS``; ``field`` names it in the message.

    Raises:
        InvalidInput: naming the field, its length and the limit.
    """
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"{field} is {len(request_id)} characters, over the limit of {MAX_REQUEST_ID_CHARS}")


def shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: clients choose what they send."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def shown_items(items: Collection[object], limit: int = 8, total: int | None = None) -> str:
    """A list for an error message, cut to its first ``limit`` items (strings cut as ``shown`` does).

    A client may send millions of names or dimensions; formatting them all would hold up the event loop.
    ``total``: how many there are in all, where ``items`` holds only the first of them.
    """
    first = [shown(item) if isinstance(item, str) else repr(item) for item in itertools.islice(items, limit)]
    total = len(items) if total is None else total
    more = f", ...] ({total} in all)" if total > len(first) else "]"
    return f"[{', '.join(first)}{more}"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for any exception raised while serving a request."""
    code, message = _status_of(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    return code, message


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    from convray.workers.pool import REPLICA_LOST  # lazy: keeps `convray classify` free of the ray import

    if isinstance(exc, ConvrayError):
        return exc.code, str(exc)
    if isinstance(exc, ModelLoadError):  # the files on disk are wrong, not the request
        return grpc.StatusCode.FAILED_PRECONDITION, f"model load failed: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        # The client's own deadline never arrives here (DeadlineExpired, or gRPC cancels the call), so this was
        # a wait inside the server, e.g. on Ray: transient, logged at warning, worth a retry.
        detail = f": {exc}" if str(exc) else ""
        return grpc.StatusCode.UNAVAILABLE, f"timed out inside the server ({type(exc).__name__}{detail}); retry"
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    if isinstance(exc, REPLICA_LOST):
        # Our own (ReplicaUnreachable, ReplicaStuck) say which replica and why in a line; Ray's run to many lines.
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return grpc.StatusCode.UNAVAILABLE, f"model replica unavailable, retry: {type(exc).__name__}" + (
            f" ({why})" if why else ""
        )
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def status_trailers(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata that tells the client more than ``code`` and ``message``: when to retry an overload.

    For an ``Overloaded`` with a delay: a ``google.rpc.RetryInfo`` in the rich status (``grpc-status-details-bin``,
    which grpcio-status's ``rpc_status.from_call`` reads), and ``grpc-retry-pushback-ms``, which gRPC's built-in
    retries wait for (gRFC A6) when the client's retry policy lists RESOURCE_EXHAUSTED. Empty otherwise.
    """
    if not isinstance(exc, Overloaded) or exc.retry_after_s is None:
        return ()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(exc.retry_after_s * 1e9))
    retry_info = any_pb2.Any()
    retry_info.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[retry_info]))
    return (*rich.trailing_metadata, ("grpc-retry-pushback-ms", str(round(exc.retry_after_s * 1e3))))
