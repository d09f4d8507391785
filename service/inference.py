"""THE hot path, top to bottom: decode -> batch -> Ray call -> split -> reply.

``Classifier.classify`` decodes one request off the event loop and submits it to its model's
batcher; ``BatchRunner`` turns a batch of decoded requests into one replica call and one result each.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
from prometheus_client import Histogram

from convray.service.codecs import (
    ClassScore,
    DecodeLimits,
    check_request_pixels,
    decode_image,
    request_pixels_may_exceed,
    top_k,
)
from convray.service.errors import InvalidInput, ModelNotReady
from convray.service.metrics import Metrics
from convray.service.pacing import OverlapAdvisor
from convray.service.statistics import ModelStatistics
from convray.workers.direct import ReplicaUnreachable
from convray.workers.pool import BatchResult, ReplicaPool

if TYPE_CHECKING:
    from convray.service.registry import ModelRegistry, ServedModel

T = TypeVar("T")


class Job(NamedTuple):
    """One decoded request waiting for a batch.

    This and the other records made per request or per batch are named tuples: as immutable as a frozen
    dataclass, and built in a third of the time (0.26 against 0.74 us for six fields), which counts on the hot path.
    """

    pixels: np.ndarray  # uint8 (C, H, W) in the model's input contract
    enqueued_at: float  # time.monotonic() when submitted


class JobResult(NamedTuple):
    """One request's row of probabilities and the timings of the batch it rode in."""

    probabilities: np.ndarray  # (classes,) float32
    queue_s: float
    batch_call_s: float
    compute_s: float
    batch_size: int
    replica: str


@dataclass(frozen=True)
class Classification:
    """The answer to one classify request."""

    model: str
    version: int
    predictions: list[ClassScore]
    decode_s: float
    total_s: float
    batch: JobResult


class BatchRunner:
    """Runs one model version's batches: stack, ONE replica call, split the probabilities back per request.

    The batch's metrics, the replica's own measurements included, are recorded here, on metric children
    looked up once per version rather than once per batch (``labels()`` costs as much as the rest).
    """

    def __init__(
        self,
        pool: ReplicaPool,
        metrics: Metrics,
        stats: ModelStatistics,
        max_batch_size: int,
        advisor: OverlapAdvisor | None = None,
    ) -> None:
        """``advisor``, when given, is told each batch's timings (it paces the batcher)."""
        self._pool, self._stats, self._max_batch_size = pool, stats, max_batch_size
        self._advisor = advisor
        self._metrics = metrics
        labels = (pool.name, str(pool.version))
        self._batch_size = metrics.batch_size.labels(*labels)
        self._fill_ratio = metrics.batch_fill_ratio.labels(*labels)
        self._call_duration = metrics.batch_call_duration.labels(*labels)
        self._compute_duration = metrics.model_compute_duration.labels(*labels)
        self._queue_wait = metrics.queue_wait.labels(*labels)
        # Replica name -> its GPU bytes (allocated, reserved) after its last batch, which its gauges read when
        # scraped: setting two gauges per batch took two locks on the loop, to write 0 on CPU every time.
        self._gpu_memory: dict[str, tuple[int, int]] = {}

    async def __call__(self, jobs: list[Job]) -> list[JobResult]:
        """One result per job, in order."""
        started = time.monotonic()
        pixels = np.stack([job.pixels for job in jobs])  # (N, C, H, W) uint8
        advisor = self._advisor
        ticket = advisor.started() if advisor else None
        try:
            result = await self._pool.predict(pixels)
        except BaseException:
            if advisor and ticket:
                advisor.finished(ticket, None, None)
            raise
        if advisor and ticket:
            if result.retried:  # its call_s holds a lost replica's failure and wait: no measure of a normal batch
                advisor.finished(ticket, None, None)
            else:
                advisor.finished(ticket, result.compute_s, result.call_s)
        if len(result.probabilities) != len(jobs):
            raise RuntimeError(f"replica returned {len(result.probabilities)} rows for a batch of {len(jobs)}")
        self._stats.record_batch(len(jobs), result.compute_s)
        self._record(len(jobs), result)
        answers = []
        for job, row in zip(jobs, result.probabilities, strict=True):
            queue_s = started - job.enqueued_at
            self._queue_wait.observe(queue_s)
            answers.append(JobResult(row, queue_s, result.call_s, result.compute_s, len(jobs), result.replica))
        return answers

    def _record(self, size: int, result: BatchResult) -> None:
        self._batch_size.observe(size)
        self._fill_ratio.observe(size / self._max_batch_size)
        self._call_duration.observe(result.call_s)
        self._compute_duration.observe(result.compute_s)
        replica, first = result.replica, result.replica not in self._gpu_memory
        self._gpu_memory[replica] = (result.gpu_memory_allocated_bytes, result.gpu_memory_reserved_bytes)
        if first:  # its series appear once it has answered a batch
            labels = (self._pool.name, str(self._pool.version), replica)
            gauges = (self._metrics.replica_gpu_memory_allocated, self._metrics.replica_gpu_memory_reserved)
            for index, gauge in enumerate(gauges):
                gauge.labels(*labels).set_function(functools.partial(self._gpu_bytes, replica, index))

    def _gpu_bytes(self, replica: str, index: int) -> int:
        return self._gpu_memory[replica][index]


class Classifier:
    """Classifies encoded images with the registry's models, through their batchers."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: DecodeLimits,
        default_top_k: int,
        decoder: Executor,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._default_top_k = default_top_k
        self._decoder = decoder
        self._metrics = metrics
        self._decode_duration: dict[str, Histogram] = {}  # per model name

    @property
    def max_image_bytes(self) -> int:
        """The largest encoded image taken (--max-image-bytes), for codecs that split images off a request."""
        return self._limits.max_image_bytes

    async def classify(
        self, image: bytes, model: str, version: int, top_k_requested: int, deadline: float | None = None
    ) -> Classification:
        """Decode, batch and run one image; return its top-k classes and timings.

        ``deadline`` (time.monotonic()) is the client's: a request still queued then is dropped unrun.

        Raises:
            InvalidInput, ModelNotFound, ModelNotReady, Overloaded: see ``service.errors``.
        """
        received = time.monotonic()

        async def run(served: ServedModel) -> Classification:
            labels = served.metadata.labels
            k = top_k_requested or min(self._default_top_k, len(labels))
            if k > len(labels):
                raise InvalidInput(f"top_k is {k} but model {served.name!r} has {len(labels)} classes")
            decode_s, (result,) = await self.infer_images(served, [image], deadline)
            return Classification(
                model=served.name,
                version=served.version,
                predictions=top_k(result.probabilities, labels, k),
                decode_s=decode_s,
                total_s=time.monotonic() - received,
                batch=result,
            )

        return await run_resolved(self._registry, model, version, run)

    async def infer_images(
        self,
        served: ServedModel,
        images: Sequence[bytes],
        deadline: float | None = None,
        unwrap: Callable[[Sequence[bytes]], Sequence[bytes]] | None = None,
    ) -> tuple[float, list[JobResult]]:
        """Decode encoded images off the event loop, then run them; returns the decode seconds and results.

        ``unwrap``, if given, turns the images as they came into the encoded images (the OIP codec's base64), on
        the decode pool too: it takes milliseconds per megabyte, which would stall every request on the loop.
        """
        received = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            with served.batcher.places(len(images)):  # the queue's bound covers the decode backlog too
                if unwrap is not None:
                    images = await loop.run_in_executor(self._decoder, unwrap, images)
                if request_pixels_may_exceed(len(images), self._limits):  # else each image's own limit bounds them
                    await loop.run_in_executor(self._decoder, check_request_pixels, images, self._limits)
                decode = functools.partial(decode_image, contract=served.metadata.input, limits=self._limits)
                if len(images) == 1:  # the common case; gather's bookkeeping costs about 20 us a request
                    pixels = [await loop.run_in_executor(self._decoder, decode, images[0])]
                else:
                    numbered = functools.partial(_decode_numbered, decode=decode, count=len(images))
                    decoding = [
                        loop.run_in_executor(self._decoder, numbered, i, image) for i, image in enumerate(images)
                    ]
                    try:
                        pixels = await asyncio.gather(*decoding)
                    except BaseException:  # the rest not yet started are dropped: they would outlive the places
                        for future in decoding:
                            future.cancel()
                        raise
        except BaseException:
            served.stats.record_request(False, time.monotonic() - received)
            raise
        decode_s = time.monotonic() - received
        decode_duration = self._decode_duration.get(served.name)
        if decode_duration is None:  # labels() costs as much as observe(): looked up once per model
            decode_duration = self._decode_duration[served.name] = self._metrics.decode_duration.labels(served.name)
        decode_duration.observe(decode_s / len(images))
        return decode_s, await self.infer_pixels(served, pixels, deadline, received)

    async def infer_pixels(
        self,
        served: ServedModel,
        pixels: Sequence[np.ndarray],
        deadline: float | None = None,
        received: float | None = None,
    ) -> list[JobResult]:
        """Run decoded uint8 images, each (C, H, W), through the model's batcher: one job per image."""
        queued = time.monotonic()
        received = queued if received is None else received
        try:
            results = await served.batcher.submit_many([Job(p, queued) for p in pixels], deadline)
        except BaseException:
            served.stats.record_request(False, time.monotonic() - received)
            raise
        served.stats.record_request(True, time.monotonic() - received, len(pixels), sum(r.queue_s for r in results))
        return results


async def run_resolved(
    registry: ModelRegistry, model: str, version: int, work: Callable[[ServedModel], Awaitable[T]]
) -> T:
    """Resolve ``(model, version)`` to a version with a replica able to serve, and run ``work`` on it.

    If that version was retired while the request was on its way (a newer version switched in, or an
    unload), resolve once more: a latest-version request moves to the new version and is not lost; a
    request naming the retired version gets NOT_FOUND. A server that is itself draining still refuses.
    A retired version refuses through its closed batcher (ModelNotReady) or, for calls that bypass the
    batcher (Explain), through its stopped replicas (ReplicaUnreachable).
    """
    served = registry.resolve_serving(model, version)
    try:
        return await work(served)
    except (ModelNotReady, ReplicaUnreachable):
        if registry.serves(served):
            raise
        return await work(registry.resolve_serving(model, version))


def _decode_numbered(index: int, image: bytes, decode: Callable[[bytes], np.ndarray], count: int) -> np.ndarray:
    """``decode(image)``; a refusal says which of the request's ``count`` images it was (1-based)."""
    try:
        return decode(image)
    except InvalidInput as exc:
        raise InvalidInput(f"image {index + 1} of {count}: {exc}") from None
