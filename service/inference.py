"""THE hot path, top to bottom: decode -> batch -> Ray call -> split -> reply.

``Classifier.classify`` decodes one request off the event loop and submits it to its model's
batcher; ``run_batch`` turns a batch of decoded requests into one Ray call and one result each.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from convray.service.codecs import ClassScore, DecodeLimits, decode_image, top_k
from convray.service.errors import InvalidInput
from convray.service.metrics import Metrics
from convray.workers.pool import ReplicaPool

if TYPE_CHECKING:
    from convray.service.registry import ModelRegistry


@dataclass(frozen=True)
class Job:
    """One decoded request waiting for a batch."""

    pixels: np.ndarray  # uint8 (C, H, W) in the model's input contract
    enqueued_at: float  # time.monotonic() when submitted


@dataclass(frozen=True)
class JobResult:
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


async def run_batch(pool: ReplicaPool, metrics: Metrics, jobs: list[Job]) -> list[JobResult]:
    """Stack the batch, make ONE Ray call for it, and split the probabilities back per request."""
    started = time.monotonic()
    pixels = np.stack([job.pixels for job in jobs])  # (N, C, H, W) uint8
    result = await pool.predict(pixels)
    if len(result.probabilities) != len(jobs):
        raise RuntimeError(f"replica returned {len(result.probabilities)} rows for a batch of {len(jobs)}")
    labels = (pool.name, str(pool.version))
    metrics.batch_size.labels(*labels).observe(len(jobs))
    metrics.batch_call_duration.labels(*labels).observe(result.call_s)
    metrics.model_compute_duration.labels(*labels).observe(result.compute_s)
    queue_wait = metrics.queue_wait.labels(*labels)
    answers = []
    for job, row in zip(jobs, result.probabilities, strict=True):
        queue_s = started - job.enqueued_at
        queue_wait.observe(queue_s)
        answers.append(JobResult(row, queue_s, result.call_s, result.compute_s, len(jobs), result.replica))
    return answers


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

    async def classify(self, image: bytes, model: str, version: int, top_k_requested: int) -> Classification:
        """Decode, batch and run one image; return its top-k classes and timings.

        Raises:
            InvalidInput, ModelNotFound, ModelNotReady, Overloaded: see ``service.errors``.
        """
        received = time.monotonic()
        served = self._registry.resolve(model, version)
        labels = served.metadata.labels
        k = top_k_requested or min(self._default_top_k, len(labels))
        if k > len(labels):
            raise InvalidInput(f"top_k is {k} but model {served.name!r} has {len(labels)} classes")
        pixels = await asyncio.get_running_loop().run_in_executor(
            self._decoder, decode_image, image, served.metadata.input, self._limits
        )
        decoded = time.monotonic()
        self._metrics.decode_duration.labels(served.name).observe(decoded - received)
        result = await served.batcher.submit(Job(pixels, decoded))
        return Classification(
            model=served.name,
            version=served.version,
            predictions=top_k(result.probabilities, labels, k),
            decode_s=decoded - received,
            total_s=time.monotonic() - received,
            batch=result,
        )
