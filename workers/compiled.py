"""A replica's ``run`` as a Ray Compiled Graph: the cheap way for a batch to cross into a replica.

A plain actor call costs about a millisecond of Ray bookkeeping (task spec, scheduling, object
store); a compiled graph keeps a shared-memory channel open to the actor and costs a fraction of
that (docs/benchmarks.md has the figures). The graph runs on a background thread of the actor, so the
actor still answers plain calls (``describe``, ``explain``) meanwhile.

Compiled Graphs are a beta Ray feature and their failure path is the weak part: when the actor dies,
Ray 2.60's asyncio reader can fail with a TypeError instead of a channel error, and executions still
in flight may never resolve. So a call here never trusts the graph to report a death: any system
error marks the graph broken (every other waiting call then fails too), and a call that has waited
``probe_after_s`` asks the actor, by a plain call, whether it is still the same process. A broken
graph raises ``RayChannelError``; the pool then drops it, uses plain calls, and compiles a new one
once Ray has restarted the actor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray.dag import InputNode
from ray.exceptions import ActorUnavailableError, RayActorError, RayChannelError, RayTaskError

log = logging.getLogger(__name__)


class CompiledRun:
    """``actor.run(pixels)`` compiled once; call it with ``await compiled(pixels)``.

    Must be created on the running event loop that will call it (the graph binds its asyncio
    reader and writer to that loop), and only that process may call it. ``pid`` is the actor's
    process id when compiled: a different one later means Ray restarted the actor and the graph is gone.
    """

    def __init__(self, actor: Any, pid: int, max_in_flight: int, probe_after_s: float = 2.0) -> None:
        with InputNode() as pixels:
            node = actor.run.bind(pixels)
        self._graph = node.experimental_compile(enable_asyncio=True, _max_inflight_executions=max_in_flight)
        self._actor, self._pid = actor, pid
        self._probe_after_s = probe_after_s
        self._broken = asyncio.Event()
        self._abandoned: set[asyncio.Future[Any]] = set()  # executions whose caller stopped waiting

    @property
    def broken(self) -> bool:
        """True once a call saw the graph fail; it is never used again."""
        return self._broken.is_set()

    async def __call__(self, pixels: np.ndarray) -> Any:
        """The actor's ``run(pixels)`` reply.

        Raises:
            RayTaskError: ``run`` raised (bad batch); the graph stays usable.
            RayChannelError: the graph or its actor is gone; retry elsewhere.
        """
        if self.broken:
            raise RayChannelError("compiled graph is broken")
        try:
            future = await self._graph.execute_async(pixels)
        except Exception as exc:  # noqa: BLE001 (any failure to submit means the graph is unusable)
            raise self._fail(exc) from exc
        result = asyncio.ensure_future(self._result(future))
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {result, broken}, timeout=self._probe_after_s, return_when=asyncio.FIRST_COMPLETED
                )
                if result in done:
                    break
                if broken in done:
                    raise RayChannelError("compiled graph broke while this batch was in flight")
                if not await self._actor_is_same_process():
                    raise self._fail(RayChannelError("replica restarted while this batch was in flight"))
        finally:
            broken.cancel()
            if not result.done():
                # Cancelled, or the graph broke: leave the execution to finish. Cancelling it would cancel the
                # future Ray's reader resolves, which then fails on it and stops answering every later execution.
                self._abandoned.add(result)
                result.add_done_callback(_forget_outcome)
                result.add_done_callback(self._abandoned.discard)
        try:
            reply = result.result()
        except RayTaskError:
            raise  # the application's error: the graph itself is fine
        except Exception as exc:  # noqa: BLE001 (ActorDiedError, RayChannelError, or Ray's own TypeError)
            raise self._fail(exc) from exc
        # The reply may be deserialised zero-copy from the channel's buffer, which the next execution reuses.
        return reply._replace(probabilities=np.array(reply.probabilities, copy=True))

    @staticmethod
    async def _result(future: Any) -> Any:
        return await future

    async def _actor_is_same_process(self) -> bool:
        try:
            described = await asyncio.wait_for(self._actor.describe.remote(), self._probe_after_s)
        except asyncio.TimeoutError:  # noqa: UP041 (busy with a plain call, e.g. explain: alive)
            return True
        except (RayActorError, ActorUnavailableError):
            return False
        return described["pid"] == self._pid

    def _fail(self, exc: BaseException) -> RayChannelError:
        if not self.broken:
            log.warning("compiled graph to a replica failed (%s: %s)", type(exc).__name__, exc)
        self._broken.set()
        return exc if isinstance(exc, RayChannelError) else RayChannelError(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Stop the graph's loop on the actor and free its channels (the actor itself keeps running)."""
        self.break_off()
        self.teardown()

    def break_off(self) -> None:
        """Fail the calls waiting on this path, at once; on the event loop (``asyncio.Event`` is not thread-safe)."""
        self._broken.set()

    def teardown(self) -> None:
        """Tear the graph down (may run in another thread: Ray's own monitor thread does too, under a lock).

        Seconds for a replica that just died (2 s in the pool tests); up to a minute on a lost cluster.
        """
        try:
            self._graph.teardown()
        except Exception as exc:  # noqa: BLE001 (a graph whose actor died may fail to tear down; nothing to free)
            log.debug("compiled graph teardown: %s", exc)


def _forget_outcome(execution: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned execution's outcome, so asyncio does not log it as never retrieved."""
    if not execution.cancelled():
        execution.exception()
