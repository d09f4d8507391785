"""A pool of Ray actors holding one model version; each batch goes to the least busy replica.

The front end calls ``predict`` once per batch, never once per image: every hop into Ray costs
about a millisecond, so requests are grouped before they cross. How a batch crosses is the pool's
``transport``: ``direct`` (a TCP connection to the replica, ``workers.direct``; the default),
``compiled-graph`` (a Ray Compiled Graph, ``workers.compiled``) or ``actor-call`` (a plain Ray actor
call). The first two are fast paths opened per replica after it starts; a replica whose fast path
broke gets plain actor calls until Ray has restarted it and the path is opened again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayChannelError, RayTaskError

from convray.workers.cluster import shortfall
from convray.workers.compiled import CompiledRun
from convray.workers.direct import DirectChannel, ReplicaUnreachable, new_token
from convray.workers.replica import AmpChoice, DeviceChoice, ModelRunner
from convray.workers.repository import ModelLoadError

if TYPE_CHECKING:
    from convray.workers.explain import CamChoice, Explanation
    from convray.workers.forward import GraphChoice

log = logging.getLogger(__name__)


class ReplicasNotPlaced(ModelLoadError):
    """A version's replicas were not running within the start timeout: the cluster, not the version, is short."""


class ReplicaStuck(ReplicaUnreachable):
    """A replica did not answer a batch within the batch timeout: alive, so Ray would not restart it."""


# A replica's process is gone (dead, or restarting), or the fast path to it (direct channel, compiled
# graph) broke; the batch it held never produced a result.
REPLICA_LOST = (RayActorError, ActorUnavailableError, RayChannelError, ReplicaUnreachable)
# After a replica was lost, how often and how many times to ask whether Ray has it running again (about two minutes
# in all). A fixed short interval: backing off, the restarted replica waited 1.4 s for the next try (found in review).
REOPEN_POLL_S = 0.5
REOPEN_ATTEMPTS = 240
DEAD_FOR_GOOD_AFTER = 3  # describe calls in a row failing ActorDiedError: Ray will not restart the replica
REPLACE_RETRY_S = (5.0, 60.0)  # a replacement that failed is tried again after 5 s, backing off to once a minute
GPU_RELEASE_WAIT_S = 5.0  # an embedded Ray's free GPU, short of a load's ask, is looked at again this long
LONE_RETRY_WAIT_S = 60.0  # a lone replica's lost batch waits this long for Ray's restart, then fails UNAVAILABLE

Transport = Literal["direct", "compiled-graph", "actor-call"]
X = TypeVar("X")
# Compiled graphs to replicas of a lost cluster, never torn down (ReplicaPool.abandon): a few per Ray loss.
_UNCLOSED_GRAPHS: list[CompiledRun] = []


class FastPath(Protocol):
    """A replica's ``run`` reached without a Ray task per batch (``DirectChannel``, ``CompiledRun``)."""

    @property
    def broken(self) -> bool:
        """True once it failed; it is then never used again."""

    async def __call__(self, pixels: np.ndarray) -> Any:
        """The replica's ``run(pixels)`` reply."""

    def close(self) -> None:
        """Free what it holds."""


@dataclass(frozen=True)
class ReplicaOptions:
    """How to start each replica actor: its Ray resources and runtime choices."""

    replicas: int = 1
    cpus_per_replica: float = 1.0  # Ray CPU resource per actor; also sets its torch threads (at least 1)
    gpus_per_replica: float = 0.0  # fractional values share a GPU between replicas
    device: DeviceChoice = "auto"
    amp: AmpChoice = "none"
    graph: GraphChoice = "auto"  # how each replica runs its forward pass (see workers.forward)
    cuda_graphs: bool = False  # on a GPU, replay the forward pass from captured CUDA graphs (workers.cuda_graphs)
    max_restarts: int = 3  # Ray restarts a dead actor this many times (its __init__ reloads the model)
    transport: Transport = "direct"  # how batches cross into a replica (see the module docstring)
    start_timeout_s: float = 600.0  # for every replica to be placed by Ray and load the version
    # No node will ever join (an embedded local Ray): replicas that need more than the whole cluster fail at once
    # instead of after start_timeout_s.
    fixed_cluster: bool = False
    batches_in_flight_per_replica: int = 2  # sizes each compiled graph's in-flight capacity
    max_batch_size: int = 32  # the batcher's: a replica on a GPU warms up every batch size up to it
    batch_timeout_s: float = 30.0  # a replica not answering a batch by then is stuck: restarted, batch retried; 0: none


class BatchResult(NamedTuple):
    """One batch's probabilities (N, classes) and where its time went (a named tuple: built once per batch)."""

    probabilities: np.ndarray
    compute_s: float  # forward pass, measured inside the actor
    call_s: float  # the whole Ray call, seen from the caller
    replica: str  # the replica that answered, as named by ReplicaPool.replica_name
    gpu_memory_allocated_bytes: int = 0  # the replica's, after this batch; 0 on CPU
    gpu_memory_reserved_bytes: int = 0
    retried: bool = False  # its first replica was lost: call_s includes the failure and the wait


@dataclass(frozen=True)
class ExplainResult:
    """One image's explanation and where its time went."""

    explanation: Explanation
    compute_s: float  # forward (and backward for Grad-CAM), measured inside the actor
    call_s: float  # the whole Ray call, seen from the caller
    replica: str


class ReplicaPool:
    """The Ray actors serving one model version, with per-replica in-flight batch counts."""

    def __init__(
        self,
        name: str,
        version: int,
        actors: list[Any],
        on_failure: Callable[[], None] | None = None,
        transport: Transport = "actor-call",
        compiled_in_flight: int = 4,
        start_replica: Callable[[], Any] | None = None,
        start_timeout_s: float = 600.0,
        on_lost: Callable[[], None] | None = None,
        direct_host: str | None = None,
        batch_timeout_s: float = 0.0,
        cuda_graphs: bool = False,
    ) -> None:
        """Wrap started actors; ``compiled_in_flight`` is each compiled graph's capacity.

        ``cuda_graphs``: the replicas were asked to replay CUDA graphs; one on a GPU that runs op by op (its
        capture failed) is logged as it comes into service, at load and after a restart or replacement.

        ``batch_timeout_s`` (0: none): a replica that has not answered a batch by then is stuck (a hung GPU, a
        deadlock, a stopped process: alive, so Ray restarts nothing). It is killed for Ray to restart, and the
        batch is retried as for a lost replica.

        ``direct_host``: the address each replica's direct listener binds (None: its node's IP, for other nodes).

        ``on_failure`` is called for each batch that found its replica dead, ``on_lost`` once per loss (the first
        batch to find it dead; the others in flight on it, and those sent before it is back, do not count again).

        ``start_replica`` starts one more actor like these (within ``start_timeout_s``), to take the place of one
        Ray will not restart; None: such a replica stays out of the rotation.
        """
        self.name, self.version = name, version
        self._start_replica = start_replica
        self._start_timeout_s = start_timeout_s
        self.transport: Transport = transport
        self._actors = actors
        self._on_failure, self._on_lost = on_failure, on_lost
        self._direct_host = direct_host
        self._batch_timeout_s = batch_timeout_s or None
        self._cuda_graphs = cuda_graphs
        self._in_flight = [0] * len(actors)
        self._tie_break = itertools.count()
        self._compiled_in_flight = compiled_in_flight
        self._token = new_token()
        self._fast_paths: list[FastPath | None] = [None] * len(actors)
        self._probes: dict[int, asyncio.Task[None]] = {}  # per lost replica: waiting for it to answer again
        # Lost replicas not yet answering again: batches go to the others meanwhile. One that never comes back
        # (Ray used up its restarts) stays here, so its instant failures do not draw every batch to it.
        self._unwell: set[int] = set()
        # Replicas whose replacement could not start either, with why: tried again in the background (``_replacing``).
        self._given_up: dict[int, str] = {}
        self._replacing: dict[int, asyncio.Task[None]] = {}
        # Per replica: compiled graphs to it being torn down in a thread, awaited before a new one is compiled.
        self._closing: dict[int, Awaitable[Any]] = {}
        # Per replica: one fast path opens at a time; the actor and process id the open path reaches.
        self._opening: collections.defaultdict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._path_ends: dict[int, tuple[Any, int]] = {}

    @classmethod
    async def start(
        cls,
        model_repo: str,
        name: str,
        version: int,
        options: ReplicaOptions,
        on_failure: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> ReplicaPool:
        """Start ``options.replicas`` actors, each loading the version, and wait until all are warm.

        Raises:
            ModelLoadError: a replica could not load the version, or was not placed and warm within
                ``options.start_timeout_s`` (the cluster lacks the CPUs/GPUs asked for); the message says which.
        """
        if options.fixed_cluster:  # off the event loop: Ray's call waits on a cluster that is not answering
            await asyncio.get_running_loop().run_in_executor(None, _refuse_what_cannot_fit, name, version, options)
        actor_class = ray.remote(ModelRunner).options(
            num_cpus=options.cpus_per_replica,
            num_gpus=options.gpus_per_replica,
            max_restarts=options.max_restarts,
            max_task_retries=0,  # retrying a batch is the front end's decision, not Ray's
        )
        threads = max(1, int(options.cpus_per_replica))
        start_replica = functools.partial(
            actor_class.remote,
            model_repo,
            name,
            version,
            replica_device(options),
            options.amp,
            threads,
            options.graph,
            options.max_batch_size,
            gpu_share=options.gpus_per_replica,
            cuda_graphs=options.cuda_graphs,
        )
        actors = [start_replica() for _ in range(options.replicas)]
        describing = asyncio.gather(*(actor.describe.remote() for actor in actors))
        try:
            described = await asyncio.wait_for(describing, options.start_timeout_s)
        except asyncio.CancelledError:  # the server stops while the version loads: leave no replica behind
            # A cancelled gather ends with CancelledError as its exception; taken here, asyncio logs no
            # "exception was never retrieved" traceback at a clean stop.
            describing.add_done_callback(take_outcome)
            _kill_quietly(*actors)
            raise
        except (RayActorError, RayTaskError) as exc:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise ModelLoadError(f"replica could not load {name} version {version}: {_root_cause(exc)}") from None
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            for actor in actors:
                ray.kill(actor, no_restart=True)
            available = ray.available_resources()
            free = {k: available.get(k, 0.0) for k in ("CPU", "GPU")}  # Ray leaves out a resource with none free
            raise ReplicasNotPlaced(
                f"{options.replicas} replica(s) of {name} version {version} were not running after "
                f"{options.start_timeout_s:g} s; each asks Ray for {options.cpus_per_replica:g} CPU and "
                f"{options.gpus_per_replica:g} GPU and the cluster has {free} free: lower --cpus-per-replica, "
                "--gpus-per-replica or --replicas, or add nodes"
            ) from None
        # Room for every batch the front end may send one replica, with margin for explain calls counted
        # against the same replica by the least-busy choice.
        capacity = 2 * options.replicas * options.batches_in_flight_per_replica
        pool = cls(
            name,
            version,
            actors,
            on_failure,
            options.transport,
            capacity,
            start_replica,
            options.start_timeout_s,
            on_lost=on_lost,
            # An embedded Ray is all on this machine: the replicas' direct listeners stay on loopback, as the
            # server's own default bind does (found in review: they listened on the machine's routable address).
            direct_host="127.0.0.1" if options.fixed_cluster else None,
            batch_timeout_s=options.batch_timeout_s,
            cuda_graphs=options.cuda_graphs,
        )
        for index, info in enumerate(described):
            pool._warn_if_graphs_failed(index, info)
        await asyncio.gather(*(pool._open_fast_path(index, info) for index, info in enumerate(described)))
        runs_on = sorted(
            {
                f"{i['device']}, {i['graph']} graph{', CUDA graphs' if i['cuda_graphs'] else ''}, "
                f"warm at batches 1-{i['warmed_up_to']}"
                for i in described
            }
        )
        log.info("%s version %d replicas run on %s; transport %s", name, version, " / ".join(runs_on), pool.transport)
        return pool

    def _warn_if_graphs_failed(self, index: int, described: dict[str, Any]) -> None:
        if self._cuda_graphs and described["device"] == "cuda" and not described["cuda_graphs"]:
            log.warning(
                "replica %s of version %d: --cuda-graphs is on but it runs its forward pass op by op on its GPU: "
                "its capture failed (the replica's log says why)",
                self.replica_name(index),
                self.version,
            )

    @property
    def size(self) -> int:
        """Number of replicas."""
        return len(self._actors)

    def fast(self) -> list[bool]:
        """Whether each replica is reached through its fast path (else by plain actor calls)."""
        return [path is not None for path in self._fast_paths]

    def in_flight(self) -> list[int]:
        """Batches currently sent to each replica and not yet answered."""
        return list(self._in_flight)

    def has_idle_replica(self, batches_out: int) -> bool:
        """Whether a well replica has none in flight once the caller's ``batches_out`` batches reached theirs.

        Then a batch sent now would run alone. A batch just formed counts on no replica until its task
        runs; without that condition a full queue saw the replica it was about to take as idle, and every
        slot overlapped (found in review).
        """
        if sum(self._in_flight) < batches_out:
            return False
        lost = self._unwell | self._given_up.keys()
        return any(count == 0 and index not in lost for index, count in enumerate(self._in_flight))

    @property
    def serving(self) -> int:
        """Replicas taking batches now: not lost (restarting, or dead and awaiting a replacement)."""
        if not self._actors:
            return 0
        return len(self._actors) - len(self._unwell | self._given_up.keys())

    @property
    def not_serving(self) -> str | None:
        """Why no replica of this version can run a batch (each died and its replacement failed); None while one can."""
        if not self._actors or len(self._given_up) < len(self._actors):
            return None
        return (
            f"{self.name} version {self.version} has no running replica: Ray will not restart them and new ones "
            f"did not start ({next(iter(self._given_up.values()))}); retrying in the background"
        )

    def replica_name(self, index: int) -> str:
        """The name of replica ``index`` in replies (timings.replica) and metric labels, e.g. ``digits-0``."""
        return f"{self.name}-{index}"

    async def predict(self, pixels: np.ndarray) -> BatchResult:
        """Run one uint8 batch (N, C, H, W) on the least busy replica (ties go round-robin).

        A replica that died (killed process, CUDA error, out of memory) is restarted by Ray; its batch
        is retried once on the least busy other replica, or on the restarted one if it is alone (waiting up
        to ``LONE_RETRY_WAIT_S`` for the restart).

        Raises:
            RayActorError, ActorUnavailableError, ReplicaUnreachable: the retry failed too, or a lone
            replica was not back in time.
        """
        started = time.perf_counter()
        index = self._least_busy()
        retried = False
        if index in self._unwell and index in self._probes:  # none is well: wait for this one, as a retry would
            await self._wait_for_restart(index, None)
        try:
            reply = await self._run_on(index, pixels)
        except REPLICA_LOST as exc:
            log.warning("replica %s-%d lost (%s); retrying its batch once", self.name, index, type(exc).__name__)
            if self._on_failure is not None:
                self._on_failure()
            self._mark_lost(index)
            lost, index = index, self._least_busy(avoid=index)
            if index == lost and lost in self._probes:  # alone: its retry waits until Ray has restarted it
                await self._wait_for_restart(lost, exc)
            reply = await self._run_on(index, pixels)
            retried = True
        if self._unwell:
            self._unwell.discard(index)  # it answered (a replica given up on, used when none was left, is back)
            self._given_up.pop(index, None)
        return BatchResult(
            reply.probabilities,
            reply.compute_s,
            time.perf_counter() - started,
            self.replica_name(index),
            reply.gpu_memory_allocated_bytes,
            reply.gpu_memory_reserved_bytes,
            retried,
        )

    async def _wait_for_restart(self, index: int, cause: BaseException | None) -> None:
        """Wait, at most ``LONE_RETRY_WAIT_S``, for the probe of lost replica ``index`` to find it running again.

        Raises:
            ReplicaUnreachable: it is not back in time.
        """
        try:
            await asyncio.wait_for(asyncio.shield(self._probes[index]), LONE_RETRY_WAIT_S)
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            raise ReplicaUnreachable(
                f"replica {self.replica_name(index)} was lost and is not running again after "
                f"{LONE_RETRY_WAIT_S:g} s; retry"
            ) from cause

    def _least_busy(self, avoid: int | None = None) -> int:
        """The replica for the next call: the least busy well one (ties round-robin).

        Never ``avoid`` while another exists, and unwell replicas only when no other is left.

        Raises:
            ReplicaUnreachable: the pool was shut down (its version unloaded) since the caller picked it.
        """
        count = len(self._actors)
        if count == 0:
            raise ReplicaUnreachable(f"{self.name} version {self.version} was unloaded; retry")
        if count == 1:
            return 0  # the only one, well or not (what the general case below picks too)
        offset = next(self._tie_break)
        others = [i for i in range(count) if i != avoid] or list(range(count))
        candidates = [i for i in others if i not in self._unwell] or others
        return min(candidates, key=lambda i: (self._in_flight[i], (i - offset) % count))

    async def _run_on(self, index: int, pixels: np.ndarray) -> Any:
        """Replica ``index``'s ``run(pixels)``, through its fast path when it has one, within the batch timeout.

        Raises:
            ReplicaStuck: no answer within ``batch_timeout_s``; the replica is being restarted.
        """
        path = self._fast_paths[index]
        self._in_flight[index] += 1
        try:
            call = self._actors[index].run.remote(pixels) if path is None else path(pixels)
            return await self._answer(index, call, "a batch")
        except REPLICA_LOST:
            if path is not None:
                self._drop_fast_path(index, path)
            raise
        finally:
            self._in_flight[index] -= 1

    async def _answer(self, index: int, call: Awaitable[X], what: str) -> X:
        """The answer of replica ``index`` to ``call``, within the batch timeout.

        Raises:
            ReplicaStuck: no answer within ``batch_timeout_s``; the replica is being restarted.
        """
        if self._batch_timeout_s is None:
            return await call
        try:
            if hasattr(asyncio, "timeout"):  # Python 3.11+: about 6 us a call, where wait_for's own task costs 28
                async with asyncio.timeout(self._batch_timeout_s):
                    return await call
            return await asyncio.wait_for(call, self._batch_timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            self._restart_stuck(index)
            raise ReplicaStuck(
                f"replica {self.replica_name(index)} did not answer {what} within {self._batch_timeout_s:g} s "
                "(--batch-timeout-s); it is being restarted"
            ) from None

    def _restart_stuck(self, index: int) -> None:
        """Kill replica ``index``, alive but not answering, for Ray to restart it (once, whatever batches saw it)."""
        if index in self._unwell:
            return  # already lost or being restarted: its other calls need not kill it again (a restart each)
        log.error("replica %s: no answer within %g s (--batch-timeout-s); restarting it",
                  self.replica_name(index), self._batch_timeout_s)  # fmt: skip
        with contextlib.suppress(Exception):  # Ray itself gone: the loss is handled as any other
            ray.kill(self._actors[index], no_restart=False)
        self._mark_lost(index)  # whichever call found it (a batch, its retry, an Explain call)

    def _mark_lost(self, index: int) -> None:
        """Take replica ``index`` out of the rotation until it answers again, counting the loss once."""
        if self._on_lost is not None and index not in self._unwell:
            self._on_lost()
        self._unwell.add(index)
        self._reopen_later(index)

    async def _open_fast_path(self, index: int, described: dict[str, Any]) -> None:
        """Open the transport's fast path to replica ``index`` (as ``describe`` described it), warmed by a batch.

        The first execution of a compiled graph sets up its channels and takes seconds; no request should pay that.
        """
        async with self._opening[index]:  # a replica lost again while its path opened has two opens (review)
            await self._open_fast_path_now(index, described)

    async def _open_fast_path_now(self, index: int, described: dict[str, Any]) -> None:
        name, pid = self.replica_name(index), int(described["pid"])
        if (held := self._fast_paths[index]) is not None:
            actor, held_pid = self._path_ends[index]
            if self._actors and actor is self._actors[index] and held_pid == pid:
                return  # an earlier open already reached this process
            self._fast_paths[index] = None  # to an earlier life of the replica: it would leak if replaced
            self._close_off_the_loop(index, held)
        if (closing := self._closing.pop(index, None)) is not None:
            await closing  # the old graph to this actor first (plain calls serve meanwhile)
        if not self._actors:
            return  # shut down meanwhile
        try:
            path: FastPath
            if self.transport == "direct":
                address = await self._actors[index].open_direct_channel.remote(self._token, self._direct_host)
                path = DirectChannel(address, self._token)
            elif self.transport == "compiled-graph":
                path = CompiledRun(self._actors[index], pid, self._compiled_in_flight)
            else:
                return
        except REPLICA_LOST:
            self._reopen_later(index)  # lost meanwhile: try again once Ray has restarted it
            return
        except Exception as exc:  # noqa: BLE001 (plain calls always work; a fast path is only faster)
            log.warning("replica %s: no %s path (%s); using plain actor calls", name, self.transport, exc)
            return
        try:
            await path(np.zeros((1, *described["input_shape"]), dtype=np.uint8))
        except REPLICA_LOST as exc:
            log.warning("replica %s: %s path failed its warm-up (%s)", name, self.transport, exc)
            self._close_off_the_loop(index, path)
            self._reopen_later(index)
            return
        except Exception as exc:  # noqa: BLE001 (e.g. out of GPU memory for a moment: plain calls still work)
            log.warning("replica %s: %s path failed its warm-up (%s); plain actor calls", name, self.transport, exc)
            path.close()
            return
        if not self._actors:  # shut down during the warm-up: shutdown() closed the paths it knew, not this one
            path.close()
            return
        self._fast_paths[index], self._path_ends[index] = path, (self._actors[index], pid)

    def _drop_fast_path(self, index: int, path: FastPath) -> None:
        """Forget a broken fast path (plain calls meanwhile) and open a new one once the actor is back."""
        if self._fast_paths[index] is not path:
            return  # another batch on the same path got here first
        self._fast_paths[index] = None
        self._close_off_the_loop(index, path)
        self._reopen_later(index)

    def _close_off_the_loop(self, index: int, path: FastPath) -> None:
        """Close a fast path to replica ``index``, which was lost; a compiled graph's teardown in a thread.

        Tearing down a compiled graph to a replica that died took 2 s, on the event loop, stalling every request
        meanwhile (measured in the pool tests). ``_open_fast_path`` waits for it before it compiles a new graph
        on the same actor. A direct channel's asyncio streams are closed on the loop: that waits on nothing.
        """
        if not isinstance(path, CompiledRun):
            path.close()
            return
        path.break_off()
        teardown = asyncio.get_running_loop().run_in_executor(None, path.teardown)
        earlier = self._closing.get(index)
        self._closing[index] = teardown if earlier is None else asyncio.gather(earlier, teardown)

    def _reopen_later(self, index: int) -> None:
        """Once Ray has replica ``index`` running again, in the background: count it well, open its fast path."""
        if index in self._probes or index in self._replacing:
            return  # already waiting for it, or already trying to replace it
        self._probes[index] = asyncio.get_running_loop().create_task(self._reopen_when_back(index))

    async def _reopen_when_back(self, index: int) -> None:
        try:
            described = await self._describe_once_back(index)
            if described is None and self._actors and self._start_replica is not None:
                described = await self._replace(index)
                if described is None and self._actors:
                    self._replacing[index] = asyncio.get_running_loop().create_task(self._keep_replacing(index))
        finally:
            del self._probes[index]  # from here a new loss starts a new wait
        if described is not None:
            await self._back_in_service(index, described)

    async def _back_in_service(self, index: int, described: dict[str, Any]) -> None:
        self._unwell.discard(index)
        self._given_up.pop(index, None)
        self._warn_if_graphs_failed(index, described)
        await self._open_fast_path(index, described)

    async def _keep_replacing(self, index: int) -> None:
        """Try to replace replica ``index`` again and again, backing off, until one starts or the pool shuts down.

        What kept the first replacement from starting (a full cluster, a node going away) may pass; until it
        does, ``not_serving`` says why when no replica is left.
        """
        delay_s, longest_s = REPLACE_RETRY_S
        try:
            while True:
                await asyncio.sleep(delay_s)
                if not self._actors:
                    return
                described = await self._replace(index)
                if described is not None:
                    break
                delay_s = min(delay_s * 2, longest_s)
        finally:
            del self._replacing[index]
        await self._back_in_service(index, described)

    async def _describe_once_back(self, index: int) -> dict[str, Any] | None:
        """Replica ``index``'s ``describe`` once Ray has it running again, asked every ``REOPEN_POLL_S``.

        None if the pool was shut down meanwhile, the replica still does not answer after ``REOPEN_ATTEMPTS`` tries,
        or one try waited the replica start timeout (Ray could not place the restart): the caller then replaces it.
        """
        died = 0
        for _ in range(REOPEN_ATTEMPTS):
            await asyncio.sleep(REOPEN_POLL_S)
            if not self._actors:
                return None  # shut down meanwhile
            try:  # answers once Ray restarted it; a restart Ray cannot place (no room, node gone) never answers
                return await asyncio.wait_for(self._actors[index].describe.remote(), self._start_timeout_s)
            except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
                log.error("replica %s: not running again %g s after it was lost; replacing it",
                          self.replica_name(index), self._start_timeout_s)  # fmt: skip
                _kill_quietly(self._actors[index])  # else its pending restart would compete with the replacement
                return None
            except ActorDiedError:  # a call to an actor Ray is restarting waits; to one it will not, fails at once
                died += 1
                if died >= DEAD_FOR_GOOD_AFTER:
                    log.error("replica %s: dead, and Ray will not restart it (--max-restarts used up)",
                              self.replica_name(index))  # fmt: skip
                    return None
            except REPLICA_LOST:
                died = 0
        log.error("replica %s: not answering after %d tries", self.replica_name(index), REOPEN_ATTEMPTS)
        return None

    async def _replace(self, index: int) -> dict[str, Any] | None:
        """Start a new replica in the place of ``index``, which Ray will not restart; its ``describe``, or None.

        Without it, a version whose replicas had all used up their restarts stayed loaded and ready while every
        request to it failed, for good.
        """
        name = self.replica_name(index)
        assert self._start_replica is not None
        log.warning("replica %s: starting a new one in its place", name)
        actor = self._start_replica()
        try:
            described = await asyncio.wait_for(actor.describe.remote(), self._start_timeout_s)
        except asyncio.CancelledError:  # the pool shuts down meanwhile: leave no replica behind
            _kill_quietly(actor)
            raise
        except Exception as exc:  # noqa: BLE001 (whatever kept it from starting, the others serve meanwhile)
            _kill_quietly(actor)
            self._given_up[index] = why = _root_cause(exc)
            log.error("replica %s: its replacement did not start either (%s); batches go to the other replicas, "
                      "and it is tried again in the background", name, why)  # fmt: skip
            return None
        if not self._actors:  # the version was unloaded meanwhile
            ray.kill(actor, no_restart=True)
            return None
        old, self._actors[index] = self._actors[index], actor
        _kill_quietly(old)
        log.info("replica %s: replaced, serving again", name)
        return described

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        """Call a replica's method, counting the call as in flight on that replica meanwhile (batch timeout too)."""
        self._in_flight[index] += 1
        try:
            return await self._answer(index, getattr(self._actors[index], method).remote(*args), f"a {method} call")
        finally:
            self._in_flight[index] -= 1

    @property
    def actors(self) -> list[Any]:
        """The replica actor handles, in index order (for operators and tests)."""
        return list(self._actors)

    async def explain(
        self,
        pixels: np.ndarray,
        blocks: list[str] | None,
        top_k: int,
        method: CamChoice = "auto",
        max_channels: int | None = None,
    ) -> ExplainResult:
        """Explain one uint8 image (C, H, W) on the least busy replica, with a direct actor call.

        The call counts as in flight on its replica, so batches meanwhile prefer the other replicas.
        See ``ModelRunner.explain`` for the arguments.
        """
        index = self._least_busy()
        started = time.perf_counter()
        explanation, compute_s = await self._call(index, "explain", pixels, blocks, top_k, method, max_channels)
        return ExplainResult(explanation, compute_s, time.perf_counter() - started, f"{self.name}-{index}")

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight on any replica, at most ``timeout_s``; whether none is."""
        deadline = time.monotonic() + timeout_s
        while any(self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not any(self._in_flight)

    def shutdown(self) -> None:
        """Stop every replica of this version (and the compiled graphs to them), on a cluster that answers."""
        paths, actors = self._let_go()
        for path in paths:
            path.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)

    def abandon(self, stop_replicas: bool = False) -> None:
        """Let go of the replicas after their cluster was lost, without waiting on it.

        No probe or replacement goes on for them (a replacement would start a replica in the next session), and
        no handle is kept. ``stop_replicas``: kill them too, for a reload in the same session, where those that
        are only slow to answer would live on; without, they end with the session being left. Compiled graphs
        are not torn down: their teardown (their finaliser's too) waits up to a minute on their actors, on the
        event loop; they are kept until the process ends instead (found in review).
        """
        paths, actors = self._let_go()
        for path in paths:
            if isinstance(path, CompiledRun):
                _UNCLOSED_GRAPHS.append(path)
            else:
                path.close()  # a direct channel: closing its sockets waits on nothing
        if stop_replicas:
            _kill_quietly(*actors)

    def _let_go(self) -> tuple[list[FastPath], list[Any]]:
        """Stop the probes and replacements, forget the fast paths and actors; return what was held."""
        for task in [*self._probes.values(), *self._replacing.values()]:
            task.cancel()  # not awaited (this runs outside the loop's tasks too): what it ends with is taken below
            task.add_done_callback(take_outcome)
        paths = [path for path in self._fast_paths if path is not None]
        actors, self._actors = self._actors, []
        self._fast_paths = [None] * len(actors)
        return paths, actors


def replica_device(options: ReplicaOptions) -> DeviceChoice:
    """The device a replica is told to use: ``auto`` with no GPU reserved for it is the CPU.

    Ray (2.60 here; ray#54868) leaves CUDA_VISIBLE_DEVICES alone for an actor with ``num_gpus=0``, so such a
    replica sees every GPU of its node, and ``auto`` alone would put it on one Ray never reserved for it.
    """
    if options.device == "auto" and options.gpus_per_replica == 0:
        return "cpu"
    return options.device


def _refuse_what_cannot_fit(name: str, version: int, options: ReplicaOptions) -> None:
    """Raise if the version's replicas ask for more CPUs or GPUs than the cluster has, or more GPU than is free.

    Only called on an embedded Ray, which nothing else uses: GPUs held by other models' replicas (or by the
    version a switch replaces) are not let go while waiting, so waiting the start timeout for them gains
    nothing (the first GPU lease's server, one whole GPU per model, waited out the timeout for a second one,
    and the message blamed the CPUs). CPUs are checked against the total only: a replica just stopped frees
    its CPU a moment later.

    Raises:
        ModelLoadError: naming the resource, the ask and the cluster's total or what is free.
    """
    each = {"CPU": options.cpus_per_replica, "GPU": options.gpus_per_replica}
    if (short := shortfall(options.replicas, each)) is not None:
        resource, asked, has = short
        raise ModelLoadError(
            f"{options.replicas} replica(s) of {name} version {version} ask Ray for {asked:g} {resource} in all "
            f"({each[resource]:g} each) and this Ray has {has:g}, and no node can join it: lower "
            f"--{resource.lower()}s-per-replica or --replicas"
            + (", or run on a machine with a GPU" if resource == "GPU" else "")
        )
    asked_gpus = options.replicas * options.gpus_per_replica
    free_gpus = ray.available_resources().get("GPU", 0.0)
    waited_s = 0.0
    while asked_gpus > free_gpus + 1e-9 and waited_s < GPU_RELEASE_WAIT_S:  # Ray frees a stopped replica's GPU late
        time.sleep(0.25)
        waited_s += 0.25
        free_gpus = ray.available_resources().get("GPU", 0.0)
    if asked_gpus > free_gpus + 1e-9:
        raise ReplicasNotPlaced(  # no other version would fit either: the load's fallback stops here
            f"{options.replicas} replica(s) of {name} version {version} ask Ray for {asked_gpus:g} GPU in all "
            f"({options.gpus_per_replica:g} each) and {free_gpus:g} is free (other models' or versions' replicas "
            "hold the rest), and no node can join this Ray: lower --gpus-per-replica or --replicas"
        )


def _kill_quietly(*actors: Any) -> None:
    """Stop these actors for good (no restart), saying nothing if Ray itself is gone (its actors went with it)."""
    for actor in actors:
        with contextlib.suppress(Exception):  # each on its own: one failing must not spare the others
            ray.kill(actor, no_restart=True)


def take_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen (a done callback), so that asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def _root_cause(exc: BaseException) -> str:
    """The last line of a Ray error's text, which names the exception raised inside the actor."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else type(exc).__name__
