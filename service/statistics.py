"""Per model-version inference statistics, kept in the shape of Triton's ModelStatistics.

Prometheus metrics (``service.metrics``) are for dashboards; these counts answer the Open Inference
Protocol's ModelStatistics RPC, which clients such as perf_analyzer read directly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and the total time it took, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """Count ``count`` occurrences that took ``seconds`` in total."""
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStatistics:
    """Requests, inferences (images) and executions (batches) of one model version."""

    inference_count: int = 0  # images inferred successfully
    execution_count: int = 0  # batches run on a replica
    last_inference_ms: int = 0  # wall-clock milliseconds since the epoch
    success: Duration = field(default_factory=Duration)  # successful requests, end to end
    fail: Duration = field(default_factory=Duration)  # failed requests, end to end
    queue: Duration = field(default_factory=Duration)  # per image: waiting in the batcher
    compute_infer: Duration = field(default_factory=Duration)  # per image: its share of batch compute
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))  # size -> compute

    def record_batch(self, size: int, compute_s: float) -> None:
        """One batch of ``size`` images ran on a replica in ``compute_s``."""
        self.execution_count += 1
        self.batches[size].add(compute_s)
        self.compute_infer.add(compute_s, count=size)
        self.last_inference_ms = int(time.time() * 1000)

    def record_request(self, ok: bool, duration_s: float, images: int = 1, queue_s: float = 0.0) -> None:
        """One request of ``images`` images finished (``ok``) after ``duration_s``, queued ``queue_s`` in all."""
        if ok:
            self.success.add(duration_s)
            self.inference_count += images
            self.queue.add(queue_s, count=images)
        else:
            self.fail.add(duration_s)
