"""Ray lost after start: notice it within seconds, say so (readiness, UNAVAILABLE), and recover or exit.

A convray server is a Ray driver. When its cluster goes away Ray itself tells the driver nothing: actor
calls hang (or keep working, if only the GCS died, until the replicas' raylets give up), and 60 s later
(``RAY_gcs_rpc_server_reconnect_timeout_s``) Ray's C++ client logs "Failed to connect to GCS within 60
seconds ... The program will terminate" and the process exits with code 1, without a drain. So:

- ``RayWatchdog`` asks the GCS for one internal-KV key every ``--ray-check-interval-s`` (off the event
  loop, with that timeout); two failures in a row mean the cluster is lost.
- ``RayGate`` (a wrapper of every method's handler, ``service.rpc.ServiceTable``) then answers every RPC that
  needs Ray with UNAVAILABLE and a message saying why, fails the ones in flight at once instead of letting them
  hang to their deadline, and makes the OIP readiness RPCs say not ready. Metadata and health RPCs still answer.
- Recovery: if the same cluster answers again (a GCS restarted with fault tolerance, a network blip),
  the replicas are checked and the server serves again. If a *new* cluster answers at the address (Ray
  says WrongClusterID), or the old one stays silent for half of Ray's reconnect timeout, the server leaves
  its dead session (``ray.shutdown``, which also disarms Ray's exit timer), joins again and reloads its
  models. If Ray is still lost after ``--ray-lost-exit-s``, the server exits with code 1 and a log line
  saying so, for its supervisor (Kubernetes) to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from convray.oip import inference_pb2 as oip
from convray.service.errors import ModelNotReady
from convray.service.metrics import Metrics
from convray.service.rpc import API_LABELS, CANCELLED_AS_UNAVAILABLE, handler_like, replies
from convray.service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# RPCs that need Ray: refused while it is lost, and failed in flight when it is lost.
NEEDS_RAY = frozenset(
    {
        "/convray.v1.Classifier/Classify",
        "/convray.v1.Classifier/ClassifyStream",
        "/convray.v1.Classifier/Explain",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
# OIP readiness RPCs: answered "not ready" while Ray is lost.
READINESS = {
    "/inference.GRPCInferenceService/ServerReady": oip.ServerReadyResponse,
    "/inference.GRPCInferenceService/ModelReady": oip.ModelReadyResponse,
}


class RayGate:
    """Refuses, and fails in flight, the RPCs that need Ray while the Ray cluster is lost.

    ``wrap`` is a ``HandlerWrapper``: the server applies it to every method once (``service.rpc.ServiceTable``).
    """

    def __init__(self, metrics: Metrics, model_label: Callable[[str], str]) -> None:
        """``model_label`` maps the model a request names to its metrics label (``ModelRegistry.metric_label``)."""
        self._metrics = metrics
        self._model_label = model_label
        self._reason: str | None = None
        self._calls: set[asyncio.Task[Any]] = set()
        self._failing: set[asyncio.Task[Any]] = set()
        # Streams whose generator is suspended at a reply that gRPC is writing: cancelled there, the cancellation
        # would land in gRPC's write, outside the generator, and gRPC would end the call with no status at all.
        self._writing: set[asyncio.Task[Any]] = set()

    @property
    def lost(self) -> bool:
        """Whether the Ray cluster is lost now."""
        return self._reason is not None

    def message(self) -> str:
        """What a refused client is told."""
        return (
            f"the Ray cluster this server uses is unreachable ({self._reason}); "
            "this server cannot classify until it is back: retry on another server or later"
        )

    def close(self, reason: str) -> int:
        """Refuse from now on, and fail every call in flight; returns how many were in flight."""
        self._reason = reason
        in_flight = [task for task in self._calls if not task.done()]
        for task in in_flight:
            self._failing.add(task)
            if task not in self._writing:  # a stream being written to fails when it resumes (_streaming)
                task.cancel(msg=CANCELLED_AS_UNAVAILABLE)  # counted UNAVAILABLE by the servicer's RpcObserver
        return len(in_flight)

    def open(self) -> None:
        """Let calls through again."""
        self._reason = None

    def refusal(self) -> str:
        """Count one call refused because Ray is lost (``convray_ray_unavailable_total``); what to tell its client."""
        self._metrics.ray_unavailable.inc()
        return self.message()

    @contextlib.asynccontextmanager
    async def tracking(self) -> AsyncIterator[None]:
        """Track the current task as a call in flight that needs Ray, for callers other than gRPC (REST).

        If Ray is lost meanwhile the task is cancelled, counted among the calls failed in flight, and the block
        ends in ``ModelNotReady`` with what its client is to be told, instead of ``CancelledError``.
        """
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._failing:
                raise
            task.uncancel()
            raise ModelNotReady(self.refusal()) from None
        finally:
            self._calls.discard(task)
            self._failing.discard(task)

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, self.refusal())

    def _count_refused(self, method: tuple[str, str], request: Any) -> None:
        """Count a call refused before its handler ran in convray_requests_total, as its handler would have."""
        model = getattr(request, "model", None)
        if model is None:
            model = getattr(request, "model_name", "")
        label = self._model_label(model if isinstance(model, str) else "")  # a stream's requests are not read here
        self._metrics.requests.labels(*method, label, grpc.StatusCode.UNAVAILABLE.name).inc()

    async def _failed_in_flight(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext) -> None:
        """The gate cancelled this call (not the client): answer UNAVAILABLE instead of CANCELLED."""
        self._failing.discard(task)
        task.uncancel()
        await self._refuse(context)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Gate ``handler`` if its method needs Ray; make a readiness method answer "not ready" while Ray is lost."""
        if method in READINESS:
            return self._readiness(handler, READINESS[method])
        if method not in NEEDS_RAY:
            return handler
        service, _, rpc = method.strip("/").partition("/")
        api_and_rpc = (API_LABELS.get(service, service), rpc)
        if handler.response_streaming:
            return self._streaming(handler, api_and_rpc)
        return self._unary_reply(handler, api_and_rpc)

    def _readiness(self, handler: grpc.RpcMethodHandler, reply: Any) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary

        async def ready(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return reply(ready=False) if self.lost else await behaviour(request, context)

        return handler_like(handler, ready)

    def _unary_reply(self, handler: grpc.RpcMethodHandler, method: tuple[str, str]) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_unary if not handler.request_streaming else handler.stream_unary

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _GatedCall(self, context, method, request):
                return await behaviour(request, context)

        return handler_like(handler, gated)

    def _streaming(self, handler: grpc.RpcMethodHandler, method: tuple[str, str]) -> grpc.RpcMethodHandler:
        behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _GatedCall(self, context, method, request):
                task = asyncio.current_task()
                async for reply in replies(behaviour(request, context)):
                    self._writing.add(task)
                    try:
                        yield reply
                    finally:
                        self._writing.discard(task)
                    if task in self._failing:  # Ray was lost while gRPC wrote that reply
                        await self._failed_in_flight(task, context)

        return handler_like(handler, gated)


class _Done:
    """An awaitable already complete: what ``_GatedCall`` gives ``async with`` when there is nothing to wait for."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()


class _GatedCall:
    """``async with`` one call through a ``RayGate``: refused while Ray is lost, else tracked.

    Tracked, so that losing Ray fails it with UNAVAILABLE. A class, not a generator: it runs once per request. Its
    enter and exit make a coroutine only when they have something to wait for (a refusal, a call the gate failed):
    the two coroutines every call made before cost 1 us of the event loop's time.
    """

    __slots__ = ("_gate", "_context", "_method", "_request", "_task")

    def __init__(self, gate: RayGate, context: grpc.aio.ServicerContext, method: tuple[str, str], request: Any) -> None:
        """``method`` is the call's (api, rpc) metric labels; ``request`` its message (or a stream's iterator)."""
        self._gate, self._context, self._method, self._request = gate, context, method, request
        self._task: asyncio.Task[Any] | None = None

    def __aenter__(self) -> Awaitable[None]:
        if self._gate.lost:
            return self._refused()
        self._track()
        return _DONE

    async def _refused(self) -> None:
        self._gate._count_refused(self._method, self._request)
        await self._gate._refuse(self._context)
        self._track()

    def _track(self) -> None:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._gate._calls.add(self._task)

    def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Awaitable[None]:
        if exc_type is asyncio.CancelledError and self._task in self._gate._failing:
            return self._failed()
        self._untrack()
        return _DONE

    async def _failed(self) -> None:
        try:
            await self._gate._failed_in_flight(self._task, self._context)  # type: ignore[arg-type]
        finally:
            self._untrack()

    def _untrack(self) -> None:
        self._gate._calls.discard(self._task)  # type: ignore[arg-type]
        self._gate._failing.discard(self._task)  # type: ignore[arg-type]


class RayWatchdog:
    """Checks the Ray cluster periodically; on loss calls ``on_lost``, then recovers or gives up.

    Args:
        probe: one check of the cluster, bounded in time by its caller; raises when it does not answer
            (``RayClusterReplaced`` from ``convray.workers.cluster`` when a new cluster answers instead).
        on_lost: called once per loss with the reason, to close the gate and flip readiness.
        recover: ``recover(rejoin)`` brings serving back: with ``rejoin`` False the old session answers
            again (check the replicas); with True leave it and join anew (reload the models). Returns
            whether the server can serve again; called again each interval while it returns False.
        on_back: called once serving can resume, with how long Ray was lost.
        interval_s: seconds between checks while all is well, and between recovery attempts.
        lost_exit_s: give up (``gave_up`` is set) when still lost after this long; 0 never.
        rejoin_after_s: when the old session stays silent this long, leave it and join anew.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
        recover: Callable[[bool], Awaitable[bool]],
        on_back: Callable[[float], Awaitable[None]],
        interval_s: float,
        lost_exit_s: float,
        rejoin_after_s: float,
        replaced: type[Exception],
    ) -> None:
        self._probe, self._on_lost, self._recover, self._on_back = probe, on_lost, recover, on_back
        self.interval_s, self.lost_exit_s, self.rejoin_after_s = interval_s, lost_exit_s, rejoin_after_s
        self._replaced = replaced
        self.gave_up = asyncio.Event()
        self.lost_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin checking, in a task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="convray-ray-watchdog")

    async def stop(self) -> None:
        """Stop checking (on shutdown)."""
        if self._task is not None:
            await cancel_and_wait(self._task)  # a probe's wait_for can swallow one cancel (see cancel_and_wait)

    async def _check(self) -> tuple[str | None, bool]:
        """(None, False) when the cluster answered, else why not and whether a new cluster answered instead."""
        try:
            await self._probe()
        except self._replaced as exc:
            return f"a new Ray cluster answers at its address ({exc})", True
        except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable GCS)
            return f"{type(exc).__name__}: {exc}".splitlines()[0], False
        return None, False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            reason, replaced = await self._check()
            if reason is None:
                continue
            if not replaced:
                reason, replaced = await self._check()  # a second miss in a row: one slow answer is no loss
                if reason is None:
                    continue
            self.lost_since = time.monotonic()
            await self._on_lost(reason)
            if not await self._until_back(rejoin=replaced):
                self.gave_up.set()
                return
            lost_for = time.monotonic() - self.lost_since
            self.lost_since = None
            await self._on_back(lost_for)

    async def _until_back(self, rejoin: bool) -> bool:
        """Try to recover each interval; False once ``lost_exit_s`` has passed without success."""
        assert self.lost_since is not None
        while True:
            lost_for = time.monotonic() - self.lost_since
            left = self.lost_exit_s - lost_for if self.lost_exit_s else None
            if left is not None and left <= 0:
                return False
            rejoin = rejoin or lost_for >= self.rejoin_after_s
            answered = False
            if not rejoin:
                reason, rejoin = await self._check()
                answered = reason is None
            if rejoin or answered:
                try:
                    if await asyncio.wait_for(self._recover(rejoin), left):
                        return True
                except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
                    return False
                except Exception:  # noqa: BLE001 (a failed attempt is retried at the next interval)
                    log.exception("recovering from the lost Ray cluster failed; trying again")
            await asyncio.sleep(self.interval_s)
