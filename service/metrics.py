"""Every convray_* Prometheus metric, created on a registry that is passed in (one per server or test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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
        self.request_duration = Histogram(
            "convray_request_duration_seconds",
            "Time from receiving a request to its reply, end to end.",
            ["api", "rpc", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.decode_duration = Histogram(
            "convray_decode_duration_seconds",
            "Image decode, colour conversion and resize.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "convray_queue_wait_seconds",
            "Time a request waited in the batcher before its batch was sent.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "convray_batch_size",
            "Requests per batch sent to a replica.",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_call_duration = Histogram(
            "convray_batch_call_duration_seconds",
            "One batch's Ray call, seen from the front end.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.model_compute_duration = Histogram(
            "convray_model_compute_duration_seconds",
            "One batch's forward pass, measured inside the replica.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
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
        self.replicas = Gauge(
            "convray_replicas",
            "Replica actors serving a model version.",
            ["model", "version"],
            registry=registry,
        )
        self.build = Info("convray_build", "Versions convray was built with.", registry=registry)
