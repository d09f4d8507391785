"""What every RPC shares: status mapping, logging and metrics around a handler, and ordered streams."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from convray.service.errors import ConvrayError, to_status
from convray.service.metrics import Metrics

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Reply = TypeVar("Reply")

# Requests of one stream being processed at once; past it, reading the stream waits (backpressure).
STREAM_WINDOW = 256


class RpcObserver:
    """Runs RPC handlers so that no exception escapes as UNKNOWN, and counts and times each call."""

    def __init__(self, api: str, metrics: Metrics, default_model: Callable[[], str]) -> None:
        self._api = api
        self._metrics = metrics
        self._default_model = default_model

    def _record(self, rpc: str, model: str, code: grpc.StatusCode, started: float) -> None:
        model_label = model or self._default_model()
        self._metrics.requests.labels(self._api, rpc, model_label, code.name).inc()
        self._metrics.request_duration.labels(self._api, rpc, model_label).observe(time.monotonic() - started)

    @staticmethod
    def _log(rpc: str, exc: Exception, code: grpc.StatusCode, message: str) -> None:
        if isinstance(exc, ConvrayError):
            log.warning("%s failed: %s %s", rpc, code.name, message)
        else:
            log.error("%s failed unexpectedly", rpc, exc_info=exc)

    async def unary(
        self, rpc: str, model: str, work: Callable[[], Awaitable[Reply]], context: grpc.aio.ServicerContext
    ) -> Reply:
        """Run ``work``; on failure abort the call with the mapped status and a message saying why."""
        started, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return await work()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 (mapped onto a status just below)
            code, message = to_status(exc)
            self._log(rpc, exc, code, message)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        finally:
            self._record(rpc, model, code, started)

    async def item(
        self, rpc: str, model: str, work: Callable[[], Awaitable[Reply]]
    ) -> Reply | tuple[grpc.StatusCode, str]:
        """Run one stream item's ``work``; a failure is returned as (code, message) so the stream goes on."""
        started, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return await work()
        except Exception as exc:  # noqa: BLE001 (answered as this item's error)
            code, message = to_status(exc)
            self._log(rpc, exc, code, message)
            return code, message
        finally:
            self._record(rpc, model, code, started)


async def ordered_concurrently(
    requests: AsyncIterator[Request], handle: Callable[[Request], Awaitable[Reply]]
) -> AsyncIterator[Reply]:
    """Handle stream requests concurrently (so they batch together) and yield replies in request order."""
    in_order: asyncio.Queue[asyncio.Task[Reply] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

    async def read_requests() -> None:
        try:
            async for request in requests:
                await in_order.put(asyncio.create_task(handle(request)))
        finally:
            await in_order.put(None)

    reader = asyncio.create_task(read_requests())
    try:
        while (task := await in_order.get()) is not None:
            yield await task
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not in_order.empty():
            if (task := in_order.get_nowait()) is not None:
                task.cancel()
