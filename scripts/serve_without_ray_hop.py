r"""`convray serve` with the hop into a replica replaced by an instant in-process reply.

Every batch still goes through the whole front end (gRPC, interceptors, servicer, OIP decoding and
checks, batcher, metrics), but ``ReplicaPool.predict`` answers at once with uniform probabilities
instead of calling a replica: a way to profile the front end's own per-request work without a replica.
It is not an upper bound on throughput: instant replies keep batches small, so each request pays more
per-batch work than with a real replica (with the direct transport the real server serves more;
docs/benchmarks.md, "Where the time goes now"). Never for serving: the answers are not the model's.

Run it exactly like `convray serve`, then drive it with `convray bench`:

    .venv/bin/python scripts/serve_without_ray_hop.py serve --no-metrics --max-batch-size 32 \
        --max-batch-delay-ms 1 --port 50300 &
    .venv/bin/convray bench --server 127.0.0.1:50300 --api oip --payload tensor --concurrency 32 --duration 5
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np

from convray.service.cli import main
from convray.workers import pool


async def instant_predict(self: pool.ReplicaPool, pixels: np.ndarray) -> pool.BatchResult:
    """Uniform probabilities for the batch, after one turn of the event loop (as an awaited call would)."""
    started = time.perf_counter()
    await asyncio.sleep(0)
    classes = 10
    probabilities = np.full((len(pixels), classes), 1.0 / classes, dtype=np.float32)
    return pool.BatchResult(probabilities, 0.0, time.perf_counter() - started, self.replica_name(0))


if __name__ == "__main__":
    pool.ReplicaPool.predict = instant_predict  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
