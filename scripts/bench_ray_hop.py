"""The hop into Ray, alone: a plain async actor call vs a Ray Compiled Graph, and what an open graph costs idle.

Starts a local Ray, one actor whose method returns at once, then from asyncio: N plain
``await actor.run.remote(x)`` calls and N compiled-graph executions of the same method (x is a
1x1x8x8 uint8 batch, as for the digits model), reporting the median round trip of each; then the
CPU seconds this process burns in 3 idle seconds while the graph is open.

Run: .venv/bin/python scripts/bench_ray_hop.py [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np
import ray
from ray.dag import InputNode


@ray.remote
class Echo:
    """An actor whose method does nothing, so only the hop is measured."""

    def run(self, batch: np.ndarray) -> int:
        """The batch's size: the least an answer can carry."""
        return batch.shape[0]


async def measure(calls: int) -> dict[str, float]:
    """Median round trips of ``calls`` plain calls and graph executions, and idle CPU with the graph open."""
    actor = Echo.remote()
    batch = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    await actor.run.remote(batch)
    plain = []
    for _ in range(calls):
        started = time.perf_counter()
        await actor.run.remote(batch)
        plain.append(time.perf_counter() - started)
    with InputNode() as pixels:
        node = actor.run.bind(pixels)
    graph = node.experimental_compile(enable_asyncio=True)
    compiled = []
    for _ in range(calls + 20):  # the first executions set the channels up
        started = time.perf_counter()
        await (await graph.execute_async(batch))
        compiled.append(time.perf_counter() - started)
    cpu_before = time.process_time()
    await asyncio.sleep(3)
    idle_cpu = time.process_time() - cpu_before
    graph.teardown()
    return {
        "plain_call_p50_ms": round(statistics.median(plain[calls // 10 :]) * 1e3, 3),
        "compiled_graph_p50_ms": round(statistics.median(compiled[20 + calls // 10 :]) * 1e3, 3),
        "idle_cpu_s_in_3_s_with_graph_open": round(idle_cpu, 2),
    }


def main() -> None:
    """Print the measurements as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(json.dumps(asyncio.run(measure(args.calls)), indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
