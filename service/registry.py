"""The model versions this server has loaded: each with its replica pool and its batcher."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from convray.service.batching import Batcher
from convray.service.config import BatchingSettings, WorkerSettings
from convray.service.errors import InvalidInput, ModelNotFound, ModelNotReady
from convray.service.inference import Job, JobResult, run_batch
from convray.service.metrics import Metrics
from convray.workers.pool import ReplicaOptions, ReplicaPool
from convray.workers.repository import ModelLoadError, ModelMetadata, ModelRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: metadata from the repository, replicas on Ray, and its batcher."""

    name: str
    version: int
    metadata: ModelMetadata
    pool: ReplicaPool
    batcher: Batcher[Job, JobResult]


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
        self._default_model = default_model
        self._batching = batching
        self._replica_options = ReplicaOptions(
            replicas=workers.replicas,
            cpus_per_replica=workers.cpus_per_replica,
            gpus_per_replica=workers.gpus_per_replica,
            device=workers.device,
            amp=workers.amp,
            max_restarts=workers.max_restarts,
        )
        self._metrics = metrics
        self._served: dict[str, dict[int, ServedModel]] = {}
        self.ready = False

    @property
    def default_model(self) -> str:
        """The model requests get when they name none."""
        if self._default_model in self._served or not self._served:
            return self._default_model
        return sorted(self._served)[0]

    def loaded_versions(self, name: str) -> list[int]:
        """Versions of ``name`` loaded now, ascending."""
        return sorted(self._served.get(name, {}))

    async def load_latest_of_each(self) -> list[str]:
        """Load the highest version of every model in the repository; return the load errors."""
        errors = []
        names = self.repository.model_names()
        if not names:
            errors.append(f"model repository {self.repository.root.resolve()} holds no model versions")
        for name in names:
            version = self.repository.latest_version(name)
            assert version is not None  # model_names() lists only models with versions
            try:
                await self.load(name, version)
            except ModelLoadError as exc:
                log.error("could not load %s version %d: %s", name, version, exc)
                errors.append(str(exc))
        self.ready = bool(self._served)
        return errors

    async def load(self, name: str, version: int) -> ServedModel:
        """Start replicas for one version and its batcher; the version serves once all replicas are warm.

        Raises:
            ModelLoadError: the version is invalid on disk or a replica failed to load it.
        """
        metadata = self.repository.read_metadata(name, version)  # fail fast, with file and field named
        pool = await ReplicaPool.start(str(self.repository.root), name, version, self._replica_options)
        batcher: Batcher[Job, JobResult] = Batcher(
            functools.partial(run_batch, pool, self._metrics),
            max_batch_size=self._batching.max_batch_size,
            max_batch_wait_s=self._batching.max_batch_delay_ms / 1000.0,
            max_queue=self._batching.max_queue,
            max_concurrent_batches=pool.size * self._batching.batches_in_flight_per_replica,
            name=f"model {name!r} version {version}",
        )
        batcher.start()
        served = ServedModel(name, version, metadata, pool, batcher)
        self._served.setdefault(name, {})[version] = served
        labels = (name, str(version))
        self._metrics.replicas.labels(*labels).set(pool.size)
        self._metrics.queue_depth.labels(*labels).set_function(lambda: batcher.queue_depth)
        log.info("loaded %s version %d on %d replica(s)", name, version, pool.size)
        return served

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
        name = name or self.default_model
        versions = self._served.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served; served models: {sorted(self._served)}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"version {version} of model {name!r} is not loaded; loaded: {sorted(versions)}")
        return versions[version]

    async def close(self) -> None:
        """Finish every queued request, then stop all replicas."""
        self.ready = False
        for versions in self._served.values():
            for served in versions.values():
                await served.batcher.close()
                served.pool.shutdown()
        self._served.clear()
