"""Batcher: a bounded asyncio queue that groups concurrent requests into batches.

A batch closes when it holds ``max_batch_size`` requests or when its first request has waited
``max_batch_wait_s`` -- unless no batch is running at all (``dispatch_when_idle``): then waiting
could only add latency, so whatever is queued goes at once. At most ``max_concurrent_batches`` run
at once, each only once ``may_start`` agrees (``service.pacing.OverlapAdvisor.may_start``); while none may,
requests keep queueing, so batches grow exactly when the workers are the bottleneck. Every admitted request
is resolved exactly once: with its result, the batch's exception, ``DeadlineExpired`` when its
deadline passed while it queued, or by its caller's cancellation (cancelled requests leave the queue
at once); expired and cancelled requests never reach a batch. Knows nothing of gRPC or Ray.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from convray.service.errors import DeadlineExpired, InvalidInput, ModelNotReady, Overloaded

T = TypeVar("T")
R = TypeVar("R")

MIN_RETRY_AFTER_S = 0.01
"""The shortest retry delay an overloaded refusal suggests (a queue that just filled has no waiting history)."""


@dataclass(eq=False, slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float | None  # time.monotonic() after which the caller no longer wants the answer
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Groups submitted items into batches and runs ``run_batch`` on each; one result per item back."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue: int,
        max_concurrent_batches: int,
        dispatch_when_idle: bool = True,
        may_start: Callable[[int], bool] | None = None,
        name: str = "batcher",
    ) -> None:
        """Start nothing yet; ``start`` begins forming batches.

        ``may_start(running)``, when given, is asked before a batch is formed while ``running`` batches
        are out: False means wait for one of them to finish (the queue meanwhile grows the next batch).
        """
        if max_batch_size < 1 or max_queue < 1 or max_concurrent_batches < 1 or max_batch_wait_s < 0:
            raise ValueError(
                "max_batch_size, max_queue and max_concurrent_batches must be >= 1 and max_batch_wait_s >= 0; "
                f"got {max_batch_size}, {max_queue}, {max_concurrent_batches}, {max_batch_wait_s}"
            )
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.max_queue = max_queue
        self.dispatch_when_idle = dispatch_when_idle
        self._may_start = may_start
        self.name = name
        self._batch_task_name = f"{name} batch"  # given, not made: each task's default name is formatted anew
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._reserved = 0  # places held for requests whose images are being decoded (``places``)
        self._reserved_at: list[float] = []  # when each holding took them, oldest first
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: dict[asyncio.Task[None], list[_Pending[T, R]]] = {}  # each batch's task and its requests
        self._batch_done = asyncio.Event()
        self._closed = False
        self._loop_task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None  # close()'s work, shared by every caller

    @property
    def queue_depth(self) -> int:
        """Requests admitted and waiting for a batch."""
        return len(self._queue)

    @property
    def batches_running(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._running)

    def start(self) -> None:
        """Start forming batches on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._form_batches(), name=self.name)

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result; past ``deadline`` (monotonic) it is dropped unrun.

        Raises:
            Overloaded: the queue already holds ``max_queue`` requests.
            ModelNotReady: the batcher is closed (the server is draining).
            DeadlineExpired: the deadline passed before the item's batch was formed.
        """
        (result,) = await self.submit_many([item], deadline)
        return result

    async def submit_many(self, items: Sequence[T], deadline: float | None = None) -> list[R]:
        """Queue several items at once, all or none, and wait for all their results (in order).

        Raises:
            Overloaded: the queue has no room for all of them now.
            InvalidInput: there are more of them than the whole queue holds.
            ModelNotReady: the batcher is closed (the server is draining).
            DeadlineExpired: the deadline passed before the items' batches were formed.
        """
        admitted = self._admit(items, deadline)
        try:
            if len(admitted) == 1:  # the common case; gather's bookkeeping costs more than the rest of submit
                return [await admitted[0].future]
            return list(await asyncio.gather(*(pending.future for pending in admitted)))
        except BaseException:
            for pending in admitted:  # the caller has its answer: the rest leave the queue (running ones are skipped)
                pending.future.cancel()
                self._forget(pending)
            raise

    @contextlib.contextmanager
    def places(self, count: int) -> Iterator[None]:
        """Hold ``count`` places in the queue while a request's images are decoded, to be submitted right after.

        Images are decoded before they queue; without this, the requests waiting for the decoder had no bound
        (found in review: 6 MB PNGs took the front end from 345 to 1,576 MiB, and refusals came 9.7 s late).
        Submit in the same step of the event loop as leaving the block, so no other request takes the places.

        Raises:
            Overloaded, InvalidInput, ModelNotReady: as ``submit_many`` would, before any decoding.
        """
        self._check_room(count)
        self._reserved += count
        taken_at = time.monotonic()
        self._reserved_at.append(taken_at)
        try:
            yield
        finally:
            self._reserved -= count
            self._reserved_at.remove(taken_at)

    def _check_room(self, count: int) -> None:
        if self._closed:
            raise ModelNotReady(f"{self.name} is shutting down; retry on another server")
        if len(self._queue) + self._reserved + count > self.max_queue:
            raise self._refusal(count)

    def _admit(self, items: Sequence[T], deadline: float | None) -> list[_Pending[T, R]]:
        self._check_room(len(items))
        loop = asyncio.get_running_loop()
        was_empty = not self._queue
        admitted = [_Pending(item, loop.create_future(), deadline) for item in items]
        self._queue.extend(admitted)
        if was_empty or len(self._queue) >= self.max_batch_size:  # the only changes a forming batch waits for
            self._wakeup.set()
        return admitted

    def _refusal(self, requested: int) -> InvalidInput | Overloaded:
        """Why ``requested`` more items cannot queue now, and when a retry could: the queue's current delay."""
        if requested > self.max_queue:  # would never fit, however long the client waits
            return InvalidInput(
                f"{self.name}: {requested} items in one request, more than its whole queue holds "
                f"({self.max_queue}, --max-queue); send at most {self.max_queue} per request"
            )
        # The oldest queued request has waited as long as the queue takes to drain (it is FIFO), so a retry
        # before then meets the same full queue. Nor does it drain before that request's batch is due, while the
        # queue holds less than a batch and the batch waits up to max_batch_wait_s to fill (found in review: with
        # a 1 s wait a client was told 10 ms and spent its three retries inside the wait).
        # Places held by requests still decoding free no sooner than their decode ends: count the oldest too.
        starts = ([self._queue[0].enqueued_at] if self._queue else []) + self._reserved_at[:1]
        waited_s = time.monotonic() - min(starts) if starts else 0.0
        filling = len(self._queue) < self.max_batch_size and not (self.dispatch_when_idle and not self._running)
        retry_after_s = max(waited_s, self.max_batch_wait_s - waited_s if filling else 0.0, MIN_RETRY_AFTER_S)
        taken = len(self._queue) + self._reserved  # queued, and held for requests being decoded
        return Overloaded(
            f"{self.name}: queue full ({taken} of {self.max_queue} places taken, {requested} more "
            f"requested; --max-queue); retry in about {retry_after_s * 1e3:.0f} ms",
            retry_after_s=retry_after_s,
        )

    def _forget(self, pending: _Pending[T, R]) -> None:
        """Take a request whose caller left out of the queue at once, so its place is free for another.

        Called by the caller itself as it leaves (not by a callback on each request's future: that cost a turn of
        the event loop per request). A running batch whose callers all left keeps its slot until its replica
        answers: the replica is still working on it, and freeing the slot would send it more than
        --batches-in-flight-per-replica.
        """
        if pending.future.cancelled():
            try:
                self._queue.remove(pending)
            except ValueError:
                pass  # already taken into a batch, which skips it

    async def close(self) -> None:
        """Refuse new requests, finish every admitted one, then stop.

        Cancelling a caller of ``close`` (an unload whose client gave up) stops its wait, not the drain: the
        admitted requests are still answered. ``abort`` is the way to stop without draining.
        """
        self._closed = True
        self._wakeup.set()
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._finish_admitted())
        await asyncio.shield(self._drain)

    async def _finish_admitted(self) -> None:
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def abort(self, reason: str) -> None:
        """Stop at once without draining (the replicas are gone).

        Every admitted request, queued or in a running batch, fails with ModelNotReady(``reason``); running batches
        are cancelled.
        """
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task, batch in list(self._running.items()):
            for pending in batch:  # UNAVAILABLE with the reason, so clients retry elsewhere; not CANCELLED
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(reason))
            task.cancel()
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(reason))

    async def _form_batches(self) -> None:
        while True:
            await self._slots.acquire()
            while self._running and self._may_start is not None and not self._may_start(len(self._running)):
                self._batch_done.clear()
                await self._batch_done.wait()
            batch = await self._next_batch()
            if not batch:
                self._slots.release()
                if self._closed and not self._queue:
                    return
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch), name=self._batch_task_name)
            self._running[task] = batch
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """Release a batch's slot: every batch task ends here, even one ``abort`` cancelled before its first step.

        (``abort`` resolves such a batch's requests itself; ``_run`` resolves them in every other case.)
        """
        del self._running[task]
        self._slots.release()
        self._batch_done.set()

    async def _next_batch(self) -> list[_Pending[T, R]]:
        while not self._queue:
            if self._closed:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        # The wait counts from the first request's arrival, so time spent waiting for a free slot counts.
        # Idle is judged once, as the batch starts to form: one that starts behind a running batch waits its full
        # delay to grow even if that batch finishes meanwhile (sending it then, half grown, made batches smaller:
        # 35 replica calls instead of under 32 for 64 requests at once, tests/service/test_server.py).
        deadline = self._queue[0].enqueued_at + self.max_batch_wait_s
        idle = self.dispatch_when_idle and not self._running
        while len(self._queue) < self.max_batch_size and not self._closed and not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            # A timer that sets the same event, not wait_for, which wraps the wait in a task of its own: about 6 us
            # more of the event loop per batch (14 against 8 us here).
            timer = asyncio.get_running_loop().call_later(remaining, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
        batch = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():
                continue  # cancelled by its caller
            if pending.deadline is not None and now >= pending.deadline:
                waited_ms = (now - pending.enqueued_at) * 1e3
                pending.future.set_exception(
                    DeadlineExpired(f"deadline passed after {waited_ms:.1f} ms in the {self.name} queue; not run")
                )
                continue
            batch.append(pending)
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        try:
            batch = [p for p in batch if not p.future.done()]  # callers that gave up since the batch was formed
            if not batch:
                return
            results = await self._run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: batch of {len(batch)} requests returned {len(results)} results")
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        except BaseException as exc:  # noqa: BLE001 (every future must be resolved, whatever happened)
            for pending in batch:
                if not pending.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        pending.future.cancel()
                    else:
                        pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
