"""When a replica should get its next batch before its last one has come back.

A second batch in flight to a replica hides the gap between its batches (the Ray round trip and the
front end's turnaround) behind compute: what a compute-bound model needs. But it also splits the
queue into more, smaller batches, each paying the per-call overhead again: what an overhead-bound
model cannot afford, because then the front end, not the replica, is the bottleneck. Measured in
docs/benchmarks.md: the small `digits` CNN served more with one batch in flight per replica, the
ResNet-style CNN more with two.

So ``OverlapAdvisor`` lets each replica have one batch always, and more only while a batch's compute
outlasts the overhead of its call, and the front end's event loop has time to spare. The timings are
measured on batches that had their replica to themselves (a batch that queued in a replica behind
another would count that wait as overhead); while batches overlap, every ``PROBE_EVERY`` batches one
waits for a replica to itself, so the measurement follows the load. The loop's load (``LoopLoad``) is
its thread's CPU time over wall time: past ``LOOP_BUSY_LIMIT`` the front end is the bottleneck, and
smaller batches would only cost it more per request. Where replicas share the front end's cores this
is what decides (docs/benchmarks.md: `digits` on 2 cores, 2,943 vs 2,510 img/s in A/B runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

PROBE_EVERY = 32  # while batches overlap, one in this many runs alone to measure the overhead again
SMOOTHING = 0.2  # weight of the newest measurement in the moving averages
LOOP_BUSY_LIMIT = 0.75  # event-loop thread's CPU share past which the front end is the bottleneck
LOAD_WINDOW_S = 0.5  # the loop's load is measured over windows of this length


class LoopLoad:
    """The share of wall time the event loop's thread spends on the CPU, over windows, smoothed.

    ``sample`` must be called from the loop's thread (it reads that thread's CPU clock); it is cheap
    and measures only when a window has passed.
    """

    def __init__(
        self,
        wall_clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._wall_clock, self._cpu_clock = wall_clock, cpu_clock
        self._since = (wall_clock(), cpu_clock())
        self.busy = 0.0  # moving average of the CPU share, 0..1 (a little over 1 only from clock noise)

    def sample(self) -> None:
        """Fold the window that has passed, if one has, into ``busy``."""
        wall = self._wall_clock()
        elapsed = wall - self._since[0]
        if elapsed < LOAD_WINDOW_S:
            return
        cpu = self._cpu_clock()  # only now: a thread's CPU clock is a system call, the wall clock is not
        self.busy += SMOOTHING * ((cpu - self._since[1]) / elapsed - self.busy)
        self._since = (wall, cpu)


class BatchTicket(NamedTuple):
    """What ``OverlapAdvisor.started`` noted about one batch, handed back to ``finished``."""

    alone: bool  # no more batches than replicas were out when it started
    crowded_starts: int  # the advisor's count of crowded starts then


class OverlapAdvisor:
    """Decides whether another batch may go out while ``running`` are out, from measured timings."""

    def __init__(
        self, replicas: int, loop_load: LoopLoad | None = None, idle_replica: Callable[[int], bool] | None = None
    ) -> None:
        """``loop_load``, when given, is sampled at each finished batch and vetoes overlap while busy.

        ``idle_replica(running)``, when given, says whether a replica that takes batches has none in flight once
        the ``running`` batches have reached theirs: a batch may then always start, even with ``replicas`` batches
        out (some held by a replica that is stuck).
        """
        self.replicas = replicas
        self.loop_load = loop_load
        self.idle_replica = idle_replica
        self.compute_s: float | None = None  # moving average, batches that ran alone
        self.overhead_s: float | None = None  # call minus compute, same batches
        self._out = 0
        self._crowded_starts = 0
        self._since_measured = 0

    @property
    def overlap_pays(self) -> bool:
        """Whether a batch's compute outlasts its call's overhead (True until measured) and the loop has time."""
        if self.loop_load is not None and self.loop_load.busy > LOOP_BUSY_LIMIT:
            return False
        if self.compute_s is None or self.overhead_s is None:
            return True
        return self.compute_s >= self.overhead_s

    def may_start(self, running: int) -> bool:
        """Whether a new batch may go out while ``running`` batches are out (``Batcher``'s ``may_start``)."""
        if running < self.replicas or (self.idle_replica is not None and self.idle_replica(running)):
            return True
        return self.overlap_pays and self._since_measured < PROBE_EVERY

    def started(self) -> BatchTicket:
        """Note a batch going out; pass the ticket to ``finished``."""
        self._out += 1
        alone = self._out <= self.replicas
        if not alone:
            self._crowded_starts += 1
        return BatchTicket(alone, self._crowded_starts)

    def finished(self, ticket: BatchTicket, compute_s: float | None, call_s: float | None) -> None:
        """Note a batch back, with its replica's compute and the whole call's seconds (None if it failed)."""
        self._out -= 1
        self._since_measured += 1
        if self.loop_load is not None:
            self.loop_load.sample()
        if compute_s is None or call_s is None or not ticket.alone or ticket.crowded_starts != self._crowded_starts:
            return  # failed, or shared a replica with another batch for part of its call
        overhead_s = max(call_s - compute_s, 0.0)
        if self.compute_s is None or self.overhead_s is None:
            self.compute_s, self.overhead_s = compute_s, overhead_s
        else:
            self.compute_s += SMOOTHING * (compute_s - self.compute_s)
            self.overhead_s += SMOOTHING * (overhead_s - self.overhead_s)
        self._since_measured = 0
