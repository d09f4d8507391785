"""The model versions this server has loaded: each with its replica pool and its batcher."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from convray.service.batching import Batcher
from convray.service.config import BatchingSettings, WorkerSettings
from convray.service.errors import InvalidInput, ModelNotFound, ModelNotReady, shown
from convray.service.inference import BatchRunner, Job, JobResult
from convray.service.metrics import Metrics
from convray.service.pacing import LoopLoad, OverlapAdvisor
from convray.service.statistics import ModelStatistics
from convray.workers.cluster import started_here
from convray.workers.pool import ReplicaOptions, ReplicaPool, ReplicasNotPlaced, take_outcome
from convray.workers.repository import MAX_NAME_CHARS, ModelLoadError, ModelMetadata, ModelRepository

X = TypeVar("X")  # what a load or unload returns
log = logging.getLogger(__name__)
POLL_RETRY_MAX_S = 600.0  # the longest wait before the poller tries a failed version again
UNKNOWN_MODEL_LABEL = "(unknown)"  # the metrics' model label for names not served (see metric_label)

# After switching to a new version, the old one keeps serving this long before it drains and stops:
# a request that picked it just before the switch may still be decoding its image off the event loop.
SWITCH_GRACE_S = 1.0
# How long an unload waits for a version's calls outside its batcher (Explain) before stopping its replicas.
UNLOAD_CALLS_GRACE_S = 30.0


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: metadata from the repository, replicas on Ray, and its batcher."""

    name: str
    version: int
    metadata: ModelMetadata
    pool: ReplicaPool
    batcher: Batcher[Job, JobResult]
    stats: ModelStatistics
    pacing: OverlapAdvisor | None = None  # None: batches in flight up to the limit, whatever the timings


class ModelRegistry:
    """Loads model versions from the repository onto replicas and finds the one a request names."""

    def __init__(
        self,
        repository: ModelRepository,
        default_model: str,
        batching: BatchingSettings,
        workers: WorkerSettings,
        metrics: Metrics,
    ) -> None:
        self.repository = repository
        self._configured_default = default_model  # --default-model
        self._chosen_default: str | None = None  # for the repository, once it holds a model (choose_default_model)
        self._batching = batching
        self._replica_options = ReplicaOptions(
            replicas=workers.replicas,
            cpus_per_replica=workers.cpus_per_replica,
            gpus_per_replica=workers.gpus_per_replica,
            device=workers.device,
            amp=workers.amp,
            graph=workers.graph,
            cuda_graphs=workers.cuda_graphs,
            max_restarts=workers.max_restarts,
            start_timeout_s=workers.replica_start_timeout_s,
            fixed_cluster=started_here(workers.ray_address),  # an embedded Ray: no node can join
            transport=workers.transport,
            batches_in_flight_per_replica=batching.batches_in_flight_per_replica,
            max_batch_size=batching.max_batch_size,
            batch_timeout_s=workers.batch_timeout_s,
        )
        self._metrics = metrics
        self._served: dict[str, dict[int, ServedModel]] = {}
        self._changing = asyncio.Lock()  # one load or unload at a time
        self._changes: set[asyncio.Future[Any]] = set()  # loads and unloads under way (see _to_completion)
        self._starting: set[asyncio.Task[Any]] = set()  # changes waiting for a new version's replicas to start
        self._poller: asyncio.Task[None] | None = None
        # Versions the poller failed to switch to: (failures so far, when to try again, on the loop's clock).
        self._failed_versions: dict[tuple[str, int], tuple[int, float]] = {}
        # Models unloaded by request (RepositoryModelUnload): neither the poller nor a recovery loads them again
        # until a load is requested.
        self._unloaded_by_request: set[str] = set()
        self.ready = False
        # Set while the Ray cluster is lost (the server's watchdog): the poller starts no load meanwhile, since
        # Ray's calls would wait on a cluster that is gone, on the event loop.
        self.ray_lost = False

    @property
    def default_model(self) -> str:
        """The model requests get when they name none (``choose_default_model``), served or not."""
        return self._chosen_default or self._configured_default

    def choose_default_model(self, names: list[str]) -> None:
        """Fix the default model for a repository holding models ``names``: ``--default-model`` if it is there.

        A repository without that model but with exactly one other makes that one the default (a repository of one
        model needs no flag). The default never moves to another model while the server runs: if it fails to load
        or is unloaded, requests that name no model are refused (NOT_FOUND) instead of being answered silently
        with another model's classes (found in review: a broken default model used to hand its requests to the
        first other model by name). Chosen once, from the first listing that holds a model: the loads after a
        lost Ray call this again, when the repository may hold more (found in review).
        """
        if self._chosen_default is not None or not names:
            return
        configured = self._configured_default
        if configured in names:
            self._chosen_default = configured
        elif len(names) == 1:
            self._chosen_default = names[0]
            log.info("the repository has no model %s; its only model, %s, is the default (--default-model)",
                     shown(configured), shown(names[0]))  # fmt: skip
        else:
            self._chosen_default = configured
            log.warning("the default model %s is not in the repository (models: %s): requests that name no model "
                        "are refused (--default-model)", shown(configured), ", ".join(names))  # fmt: skip

    def metric_label(self, requested: str) -> str:
        """The ``model`` label of a request naming ``requested`` ('' is the default model).

        A name this server does not serve is labelled ``(unknown)`` (no model can be called that):
        clients choose the names, and a label per name they send would grow the metrics without bound.
        """
        if not requested:
            return self.default_model
        return requested if self._versions_named(requested) is not None else UNKNOWN_MODEL_LABEL

    def _versions_named(self, name: str) -> dict[int, ServedModel] | None:
        """The served versions of a model a request names, or None if none is served by that name.

        A name longer than any model may have is not looked up, so not hashed: a request may name a model in
        megabytes, and each lookup hashed it again (found in review).
        """
        return self._served.get(name) if len(name) <= MAX_NAME_CHARS else None

    def serves(self, served: ServedModel) -> bool:
        """Whether ``served`` is still loaded (False once a switch or unload retired it)."""
        return self._served.get(served.name, {}).get(served.version) is served

    def loaded_versions(self, name: str) -> list[int]:
        """Versions of ``name`` loaded now, ascending."""
        return sorted(self._served.get(name, {}))

    async def load_latest_of_each(self) -> list[str]:
        """Serve every model in the repository, at its highest version that loads; return the load errors.

        A broken highest version (a bad publish) falls back to the one below, so that a restart after it serves
        what ran before instead of exiting; the poller keeps trying the highest one. Replicas that could not be
        placed in time do not fall back: the cluster is short, and waiting again per version would outlast the
        start-up probe. Models unloaded by request are left out. Versions already loaded are kept.

        Models load one after another, not together: on a cluster short of room for all, replicas started
        together could each take part of it and leave every model short of its replicas until the start
        timeout, where in turn the first models load and only the last ones fail.
        """
        errors = []
        names = self.repository.model_names()
        if not names:
            root = self.repository.root.resolve()
            why = "holds no model versions" if root.is_dir() else "does not exist (--model-repo)"
            errors.append(f"model repository {root} {why}")
        self.choose_default_model(names)
        async with self._changing:
            for name in names:
                if name in self._unloaded_by_request or self._served.get(name):
                    continue
                for version in reversed(self.repository.versions(name)):
                    try:
                        await self.load(name, version)
                        break
                    except ModelLoadError as exc:
                        log.error("could not load %s version %d: %s", name, version, exc)
                        errors.append(str(exc))
                        if isinstance(exc, ReplicasNotPlaced):  # no other version would fit either
                            break
        self.ready = bool(self._served)
        return errors

    async def load(self, name: str, version: int) -> ServedModel:
        """Start replicas for one version and its batcher; the version serves once all replicas are warm.

        Raises:
            ModelLoadError: the version is invalid on disk or a replica failed to load it.
        """
        started = time.monotonic()
        try:
            metadata = self.repository.read_metadata(name, version)  # fail fast, with file and field named
            starting = asyncio.current_task()
            assert starting is not None
            self._starting.add(starting)  # close() cancels it rather than wait up to the replicas' start timeout
            try:
                pool = await ReplicaPool.start(
                    str(self.repository.root),
                    name,
                    version,
                    self._replica_options,
                    on_failure=self._metrics.replica_failures.labels(name, str(version)).inc,
                    on_lost=self._metrics.replica_losses.labels(name, str(version)).inc,
                )
            finally:
                self._starting.discard(starting)
        except ModelLoadError:
            self._metrics.model_loads.labels(name, str(version), "failure").inc()
            raise
        stats = ModelStatistics()
        advisor = (
            OverlapAdvisor(pool.size, LoopLoad(), pool.has_idle_replica) if self._batching.adaptive_in_flight else None
        )
        batcher: Batcher[Job, JobResult] = Batcher(
            BatchRunner(pool, self._metrics, stats, self._batching.max_batch_size, advisor),
            max_batch_size=self._batching.max_batch_size,
            max_batch_wait_s=self._batching.max_batch_delay_ms / 1000.0,
            max_queue=self._batching.max_queue,
            max_concurrent_batches=pool.size * self._batching.batches_in_flight_per_replica,
            dispatch_when_idle=self._batching.dispatch_when_idle,
            may_start=advisor.may_start if advisor else None,
            name=f"model {name!r} version {version}",
        )
        batcher.start()
        served = ServedModel(name, version, metadata, pool, batcher, stats, advisor)
        self._served.setdefault(name, {})[version] = served
        labels = (name, str(version))
        self._metrics.replicas.labels(*labels).set_function(lambda: pool.serving)
        self._metrics.queue_depth.labels(*labels).set_function(lambda: batcher.queue_depth)
        overlaps = self._batching.batches_in_flight_per_replica > 1
        self._metrics.batch_overlap.labels(*labels).set_function(
            lambda: int(overlaps and (advisor is None or advisor.overlap_pays))
        )
        for index in range(pool.size):
            self._metrics.replica_in_flight_batches.labels(*labels, pool.replica_name(index)).set_function(
                functools.partial(lambda i: pool.in_flight()[i], index)
            )
            self._metrics.replica_fast_path.labels(*labels, pool.replica_name(index), pool.transport).set_function(
                functools.partial(lambda i: int(pool.fast()[i]), index)
            )
        self._metrics.model_unloads.labels(*labels)  # exported at 0 from the start, so rate() and alerts see it
        for api in ("native", "oip"):
            self._metrics.in_flight_requests.labels(api, name)
            self._metrics.overload_rejections.labels(api, name)
            self._metrics.deadline_expired.labels(api, name)
        self._metrics.model_loads.labels(*labels, "success").inc()
        self._metrics.model_load_duration.labels(name).observe(time.monotonic() - started)
        log.info("loaded %s version %d on %d replica(s)", name, version, pool.size)
        return served

    def _to_completion(self, change: Coroutine[Any, Any, X], what: str) -> Awaitable[X]:
        """Run a load or unload as a task that finishes even if its caller stops waiting.

        A client whose deadline passes cancels its RPC's handler. Cut off halfway, a change would leave a
        version forgotten but still holding its replicas and queued requests, or two versions serving.
        A change that fails after its caller has gone is logged here, since no one else will say so.
        """
        task = asyncio.ensure_future(change)
        waited = asyncio.shield(task)

        def report_if_unheard(done: asyncio.Future[X]) -> None:
            take_outcome(done)  # its caller may be gone: the failure reached whoever still waits
            if waited.cancelled() and not done.cancelled() and done.exception() is not None:
                log.warning("%s failed after its caller stopped waiting: %s", what, done.exception())

        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(report_if_unheard)
        return waited

    async def load_latest(self, name: str) -> ServedModel:
        """Serve the highest version of ``name`` on disk; once it is warm, unload the older ones.

        A failed load leaves whatever was serving untouched. The change completes even if the caller is
        cancelled.

        Raises:
            ModelNotFound: the repository has no version of ``name``.
            ModelLoadError: the version is invalid or its replicas failed to load it.
        """
        self._unloaded_by_request.discard(name)
        return await self._to_completion(self._load_latest(name), f"loading {shown(name)}")

    async def _load_latest(self, name: str) -> ServedModel:
        async with self._changing:
            version = self.repository.latest_version(name)
            if version is None:
                raise ModelNotFound(f"model {shown(name)} has no versions in {self.repository.root}")
            current = self._served.get(name, {})
            served = current.get(version) or await self.load(name, version)
            older = [v for v in current if v != version]
            if older:  # version-0 requests resolve to the new one from now on; explicit ones still find theirs
                await asyncio.sleep(SWITCH_GRACE_S)
            for old in older:
                await self._unload_version(name, old)
            return served

    def start_polling(self, interval_s: float) -> None:
        """Every ``interval_s``, serve any version newer than the served ones (``load_latest``); 0: never."""
        if interval_s > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll(interval_s), name="convray-model-poller")

    async def _poll(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            if self.ray_lost or not self.ready:  # Ray is gone, or the server is loading its models again
                continue
            for name in self.repository.model_names():
                newest = self.repository.latest_version(name)
                loaded = self.loaded_versions(name)
                if newest is None or name in self._unloaded_by_request or newest <= max(loaded, default=0):
                    continue
                failures, retry_at = self._failed_versions.get((name, newest), (0, 0.0))
                if loop.time() < retry_at:
                    continue
                if not failures:
                    log.info("model repository has %s version %d; loading it", name, newest)
                try:
                    await self._to_completion(self._load_latest(name), f"loading {shown(name)}")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 (keep serving what is loaded, and keep polling)
                    # Tried again, less and less often: a failure may pass (no room for the new replicas until
                    # the cluster grows, a copy still being written), and a front end that never retried would
                    # serve the old version for good while others serve the new one.
                    wait_s = min(interval_s * 2 ** (failures + 1), POLL_RETRY_MAX_S)
                    self._failed_versions[(name, newest)] = (failures + 1, loop.time() + wait_s)
                    expected = isinstance(exc, ModelLoadError | ModelNotFound)
                    report = log.warning if not failures else log.info
                    report("not switching to %s version %d: %s (trying again in %.0f s)", name, newest,
                           exc if expected else f"{type(exc).__name__}: {exc}", wait_s,
                           exc_info=None if expected else exc)  # fmt: skip
                else:
                    self._failed_versions.pop((name, newest), None)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``, after finishing the requests already queued.

        The unload completes (queued requests answered, replicas stopped) even if the caller is cancelled.

        Raises:
            ModelNotFound: no version of ``name`` is loaded.
        """
        await self._to_completion(self._unload(name), f"unloading {shown(name)}")

    async def _unload(self, name: str) -> None:
        async with self._changing:
            if not self._served.get(name):
                raise ModelNotFound(f"model {shown(name)} is not loaded; loaded models: {sorted(self._served)}")
            self._unloaded_by_request.add(name)
            for version in list(self._served[name]):
                await self._unload_version(name, version)

    async def _unload_version(self, name: str, version: int) -> None:
        served = self._served.get(name, {}).pop(version, None)
        if served is None:  # abandoned meanwhile: Ray was lost during a switch, and its replicas were let go then
            return
        if not self._served[name]:
            del self._served[name]
        await served.batcher.close()  # new requests now resolve elsewhere; queued ones finish here
        await served.pool.wait_idle(UNLOAD_CALLS_GRACE_S)  # calls outside the batcher (Explain) finish too
        self._forget_version_series(served)
        served.pool.shutdown()
        self._metrics.model_unloads.labels(name, str(version)).inc()
        log.info("unloaded %s version %d", name, version)

    def _forget_version_series(self, served: ServedModel) -> None:
        """Zero the gauges of a version no longer served and drop its replicas' series (before its pool stops).

        The gauges' functions held the version's pool (and so its replicas' handles): replaced, they let it go.
        """
        name, version = served.name, served.version
        replica_names = [served.pool.replica_name(i) for i in range(served.pool.size)]
        for gauge in (self._metrics.replicas, self._metrics.queue_depth, self._metrics.batch_overlap):
            gauge.labels(name, str(version)).set_function(lambda: 0)
        for replica in replica_names:
            self._metrics.replica_fast_path.remove(name, str(version), replica, self._replica_options.transport)
        for gauge in (
            self._metrics.replica_in_flight_batches,
            self._metrics.replica_gpu_memory_allocated,
            self._metrics.replica_gpu_memory_reserved,
        ):
            for replica in replica_names:
                try:
                    gauge.remove(name, str(version), replica)
                except KeyError:  # a replica that never answered a batch has no GPU memory series
                    pass

    def served_versions(self) -> list[ServedModel]:
        """Every loaded version, by model name then version."""
        return [self._served[n][v] for n in sorted(self._served) for v in sorted(self._served[n])]

    def resolve(self, name: str, version: int) -> ServedModel:
        """The served version a request names ('' = default model, 0 = highest loaded version).

        Raises:
            InvalidInput: negative version.  ModelNotReady: still starting.
            ModelNotFound: model or version not loaded (the message lists what is).
        """
        if version < 0:
            raise InvalidInput(f"version must be 0 (latest) or a positive integer, got {version}")
        if not self.ready:
            raise ModelNotReady("server is starting: models are still loading; retry shortly")
        wanted = name or self.default_model
        versions = self._versions_named(wanted)
        if not versions:
            if not name:
                raise ModelNotFound(
                    f"the request names no model, and the default model {shown(wanted)} is not served "
                    f"(--default-model); name one of the served models: {sorted(self._served)}"
                )
            raise ModelNotFound(f"model {shown(name)} is not served; served models: {sorted(self._served)}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"version {version} of model {shown(wanted)} is not loaded; loaded: {sorted(versions)}")
        return versions[version]

    def resolve_serving(self, name: str, version: int) -> ServedModel:
        """``resolve``, refusing a version that has no replica able to run a batch now.

        Raises:
            ModelNotReady: every replica of the version is dead and no replacement has started (yet).
            And whatever ``resolve`` raises.
        """
        served = self.resolve(name, version)
        if (why := served.pool.not_serving) is not None:
            raise ModelNotReady(why)
        return served

    async def abandon_all(self, wait_s: float = 0.5, stop_replicas: bool = False) -> None:
        """Forget every loaded version without draining, after their Ray cluster was lost with their replicas.

        Each batcher gets ``wait_s`` to resolve what it holds before what still waits on the lost cluster is
        cancelled. ``stop_replicas``: kill the replicas, for a reload in the same Ray session, where those that
        are only slow to answer would otherwise live on, holding their CPUs and GPUs (found in review: a reload
        of a newer version left the old one's replica running until the server exited, and one of the same
        version could not be placed beside them). Without, they are left to end with the session being left.
        Either way no probe or replacement goes on for them and their metric series go.
        """
        self.ready = False
        for starting in self._starting:  # a load waiting for replicas on the lost cluster would wait its timeout
            starting.cancel()
        served, self._served = self.served_versions(), {}
        for version in served:
            try:
                await asyncio.wait_for(version.batcher.close(), wait_s)
            except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
                version.batcher.abort(f"{version.name} version {version.version} lost its Ray cluster; retry")
            self._forget_version_series(version)
            version.pool.abandon(stop_replicas)

    async def close(self, timeout_s: float | None = None) -> None:
        """Finish every queued request, then stop all replicas.

        ``timeout_s``: how long the batches still running may take (the rest of a drain's grace period). Past it
        (a stuck replica, a lone one's retry waiting for its restart) their requests fail UNAVAILABLE and the
        replicas are stopped anyway: a server told to stop must not wait on them for ever (found in review).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
        if self._changes:  # a change under way ends first; a load waiting for replicas is cancelled, not awaited
            for starting in self._starting:
                starting.cancel()
            await asyncio.wait(set(self._changes))
        versions = self.served_versions()
        closing = {asyncio.ensure_future(served.batcher.close()): served for served in versions}  # all at once
        if closing:
            left_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            _, still_running = await asyncio.wait(closing, timeout=left_s)
            for task in still_running:
                served = closing[task]
                log.warning("%s version %d: batches still running at the end of the drain; stopping anyway",
                            served.name, served.version)  # fmt: skip
                served.batcher.abort(
                    f"the server stopped before this request's batch of {served.name} came back; retry"
                )
            await asyncio.gather(*still_running, return_exceptions=True)  # abort() lets them end
        for served in versions:
            served.pool.shutdown()
        self._served.clear()
