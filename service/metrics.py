"""Every convray_* Prometheus metric, created on a registry that is passed in (one per server or test)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.samples import Sample

from convray.workers.progress import EpochProgress

# From 100 us to 30 s: resolves both sub-millisecond hops and multi-second stalls.
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Batch size over the configured maximum: how full the batches the batcher sends are.
FILL_RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Loading a model version onto its replicas: from a warm local load to a large model on a cold GPU.
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


FLUSH_AT = 1024
"""Observations a ``BufferedHistogram`` holds before counting them into its buckets, when nothing reads it sooner."""


class BufferedHistogram(Histogram):
    """A Histogram whose ``observe`` only queues the value; values are counted into the buckets when read.

    prometheus_client's ``observe`` walks the buckets in Python and takes two locks: 0.78 us, paid on the event
    loop for each request and batch. Queueing costs 0.05 us; the queue is counted in one vectorised pass when
    the metric is collected (a scrape) or once it holds ``FLUSH_AT`` values, so what a scrape reads is exact.
    Exemplars are not queued (prometheus_client's path). Safe to observe from any thread.
    """

    def _metric_init(self) -> None:
        super()._metric_init()
        self._queued: collections.deque[float] = collections.deque()
        self._counting = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Queue ``amount`` to be counted (at once, with an exemplar)."""
        if exemplar:
            super().observe(amount, exemplar)
            return
        queued = self._queued
        queued.append(amount)
        if len(queued) >= FLUSH_AT:
            self._count_queued()

    def _count_queued(self) -> None:
        with self._counting:  # a scrape and the loop may count at once: each takes what was queued when it began
            queued = self._queued
            values = np.array([queued.popleft() for _ in range(len(queued))], dtype=np.float64)
        if not len(values):
            return
        self._sum.inc(float(values.sum()))
        # The first bucket whose bound is >= the value, as Histogram.observe picks it; NaN falls in none.
        counts = np.bincount(np.searchsorted(self._upper_bounds, values), minlength=len(self._upper_bounds) + 1)
        for bucket, count in zip(self._buckets, counts[: len(self._buckets)].tolist(), strict=True):
            if count:
                bucket.inc(count)

    def _child_samples(self) -> Iterable[Sample]:
        self._count_queued()
        return super()._child_samples()


class Metrics:
    """The server's metrics; attribute names match the exported names without the prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "convray_requests",
            "RPCs answered, by API, RPC, model and gRPC status code.",
            ["api", "rpc", "model", "code"],
            registry=registry,
        )
        self.request_duration = BufferedHistogram(
            "convray_request_duration_seconds",
            "Time from receiving a request to its reply, end to end.",
            ["api", "rpc", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.decode_duration = BufferedHistogram(
            "convray_decode_duration_seconds",
            "Image decode, colour conversion and resize.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_wait = BufferedHistogram(
            "convray_queue_wait_seconds",
            "Time a request waited in the batcher before its batch was sent.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = BufferedHistogram(
            "convray_batch_size",
            "Requests per batch sent to a replica.",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_call_duration = BufferedHistogram(
            "convray_batch_call_duration_seconds",
            "One batch's call into its replica (direct, compiled graph or Ray call), seen from the front end.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.model_compute_duration = BufferedHistogram(
            "convray_model_compute_duration_seconds",
            "One batch's forward pass, measured inside the replica.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_fill_ratio = BufferedHistogram(
            "convray_batch_fill_ratio",
            "Batch size divided by the configured maximum batch size (1 = full batch).",
            ["model", "version"],
            buckets=FILL_RATIO_BUCKETS,
            registry=registry,
        )
        self.in_flight_requests = Gauge(
            "convray_in_flight_requests",
            "RPCs (and stream items) being handled now, from arrival to reply.",
            ["api", "model"],
            registry=registry,
        )
        self.overload_rejections = Counter(
            "convray_overload_rejections",
            "Requests refused with RESOURCE_EXHAUSTED because the model's queue was full.",
            ["api", "model"],
            registry=registry,
        )
        self.batch_overlap = Gauge(
            "convray_batch_overlap",
            "1 while a replica may be sent a second batch before its first returns (a batch's compute "
            "outlasts its call's overhead and the front end's event loop has time, or --adaptive-in-flight is off), "
            "0 while it gets one at a time.",
            ["model", "version"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "convray_queue_depth",
            "Requests waiting in the batcher.",
            ["model", "version"],
            registry=registry,
        )
        self.deadline_expired = Counter(
            "convray_deadline_expired",
            "Requests whose client deadline passed before they were answered (queued ones are dropped unrun).",
            ["api", "model"],
            registry=registry,
        )
        self.replica_failures = Counter(
            "convray_replica_failures",
            "Batch calls that found their replica dead (Ray restarts it; the batch is retried once elsewhere).",
            ["model", "version"],
            registry=registry,
        )
        self.replica_losses = Counter(
            "convray_replica_losses",
            "Replicas found dead, once per death however many batches found it (alert on this, not on failures).",
            ["model", "version"],
            registry=registry,
        )
        self.replicas = Gauge(
            "convray_replicas",
            "Replica actors of a model version able to take batches now (not lost, restarting or awaiting a "
            "replacement); 0 once unloaded.",
            ["model", "version"],
            registry=registry,
        )
        self.replica_in_flight_batches = Gauge(
            "convray_replica_in_flight_batches",
            "Batches sent to a replica and not yet answered.",
            ["model", "version", "replica"],
            registry=registry,
        )
        self.replica_fast_path = Gauge(
            "convray_replica_fast_path",
            "1 while batches reach the replica through its fast path (--transport direct or compiled-graph), "
            "0 while they go by plain Ray actor calls (always with actor-call; otherwise the path broke or could "
            "not be opened, and the log says why).",
            ["model", "version", "replica", "transport"],
            registry=registry,
        )
        self.replica_gpu_memory_allocated = Gauge(
            "convray_replica_gpu_memory_allocated_bytes",
            "GPU memory held by tensors in a replica (torch.cuda.memory_allocated), as of its last batch; 0 on CPU.",
            ["model", "version", "replica"],
            registry=registry,
        )
        self.replica_gpu_memory_reserved = Gauge(
            "convray_replica_gpu_memory_reserved_bytes",
            "GPU memory reserved by torch's caching allocator in a replica, as of its last batch; 0 on CPU.",
            ["model", "version", "replica"],
            registry=registry,
        )
        self.model_loads = Counter(
            "convray_model_loads",
            "Attempts to load a model version onto its replicas, by outcome (success or failure).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.model_unloads = Counter(
            "convray_model_unloads",
            "Model versions unloaded (replaced by a newer version, or unloaded on request).",
            ["model", "version"],
            registry=registry,
        )
        self.model_load_duration = BufferedHistogram(
            "convray_model_load_duration_seconds",
            "Time to start a version's replicas and warm them up, successful loads only.",
            ["model"],
            buckets=LOAD_BUCKETS_S,
            registry=registry,
        )
        self.build = Info("convray_build", "Versions convray was built with.", registry=registry)
        self.ray_connected = Gauge(
            "convray_ray_connected",
            "1 while this front end's Ray cluster answers its checks, 0 before it is joined and while it is lost.",
            registry=registry,
        )
        self.ray_lost = Counter(
            "convray_ray_lost", "Times the Ray cluster became unreachable after the server was up.", registry=registry
        )
        self.ray_unavailable = Counter(
            "convray_ray_unavailable_requests",
            "Requests refused, or failed in flight, with UNAVAILABLE because the Ray cluster was unreachable.",
            registry=registry,
        )


def _model_gauge(registry: CollectorRegistry, name: str, documentation: str) -> Gauge:
    """A gauge labelled by ``model`` alone: a training run's or a search's, one model per process."""
    return Gauge(name, documentation, ["model"], registry=registry)


class TrainingMetrics:
    """A training run's progress, one gauge per quantity, labelled by the model being trained."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self._model = model
        self.epoch = _model_gauge(registry, "convray_train_epoch", "Epochs completed in the current training run.")
        self.epochs = _model_gauge(registry, "convray_train_epochs", "Epochs the current training run will take.")
        self.loss = _model_gauge(registry, "convray_train_loss", "Mean training loss over the last completed epoch.")
        self.accuracy = _model_gauge(
            registry,
            "convray_train_accuracy",
            "Training-set accuracy (0..1) over the last completed epoch, on augmented batches.",
        )
        self.images_per_second = _model_gauge(
            registry, "convray_train_images_per_second", "Training throughput over the last completed epoch."
        )

    def observe_epoch(self, progress: EpochProgress) -> None:
        """Record one finished epoch."""
        self.epoch.labels(self._model).set(progress.epoch)
        self.epochs.labels(self._model).set(progress.epochs)
        self.loss.labels(self._model).set(progress.loss)
        self.accuracy.labels(self._model).set(progress.accuracy)
        self.images_per_second.labels(self._model).set(progress.images_per_second)


class SearchMetrics:
    """A hyperparameter search's progress (``convray tune --metrics-port``), labelled by the model being searched.

    Trials run one at a time, so the running trial's epochs are the ``convray_train_*`` gauges of ``training``, as
    for ``convray train``; the search adds which trial is running, of how many, how many failed, and the running
    trial's held-out accuracy. Implements ``SearchProgress``.
    """

    def __init__(self, registry: CollectorRegistry, model: str, trials: int, epochs: int) -> None:
        """Gauges for a search of ``trials`` trials of ``epochs`` epochs each, set from the start."""
        self.registry = registry
        self.training = TrainingMetrics(registry, model)
        self._model = model
        self.trial = _model_gauge(
            registry, "convray_tune_trial", "The search's running trial, 1-based (trials run one at a time)."
        )
        self.trials = _model_gauge(registry, "convray_tune_trials", "Trials the search will run.")
        self.trials_failed = _model_gauge(
            registry, "convray_tune_trials_failed", "Trials of the search that failed so far."
        )
        self.val_accuracy = _model_gauge(
            registry,
            "convray_tune_val_accuracy",
            "Held-out accuracy (0..1) of the running trial's last completed epoch: what picks the winner.",
        )
        self.trials.labels(model).set(trials)
        self.training.epochs.labels(model).set(epochs)
        self.trials_failed.labels(model).set(0)

    def trial_started(self, number: int) -> None:
        """Trial ``number`` has started: the last trial's epoch figures are cleared."""
        self.trial.labels(self._model).set(number)
        self.training.epoch.labels(self._model).set(0)
        for last_trials in (self.training.loss, self.training.accuracy, self.training.images_per_second):
            last_trials.clear()
        self.val_accuracy.clear()

    def epoch_finished(self, progress: EpochProgress, val_accuracy: float) -> None:
        """The running trial finished an epoch."""
        self.training.observe_epoch(progress)
        self.val_accuracy.labels(self._model).set(val_accuracy)

    def trial_failed(self) -> None:
        """The running trial failed."""
        self.trials_failed.labels(self._model).inc()
