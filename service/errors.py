"""convray's exceptions and the one mapping of any exception onto a gRPC status code.

Handlers never let an exception escape: grpc would turn it into UNKNOWN, which tells a client nothing.
"""

from __future__ import annotations

import asyncio

import grpc

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
    """The model's queue is full; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ConvrayError):
    """The client's deadline passed while the request waited; it was dropped before any compute."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for any exception raised while serving a request."""
    from convray.workers.pool import REPLICA_LOST  # lazy: keeps `convray classify` free of the ray import

    if isinstance(exc, ConvrayError):
        return exc.code, str(exc)
    if isinstance(exc, ModelLoadError):  # the files on disk are wrong, not the request
        return grpc.StatusCode.FAILED_PRECONDITION, f"model load failed: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the request was served"
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    if isinstance(exc, REPLICA_LOST):
        return grpc.StatusCode.UNAVAILABLE, f"model replica unavailable, retry: {type(exc).__name__}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
