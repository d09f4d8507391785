"""The hop into a replica, alone: a plain async actor call, a direct channel and a Ray Compiled Graph.

Starts a local Ray, one actor whose method returns at once, then from asyncio: N plain
``await actor.run.remote(x)`` calls, N calls over a ``workers.direct`` channel to the same actor (over loopback
TCP, then over its local Unix socket where the platform has one), and N compiled-graph executions of the same
method (x is a 1x1x8x8 uint8 batch, as for the digits model), reporting the median round trip of each and the
caller's CPU per plain and direct call; then the CPU seconds this process burns in 3 idle seconds while the
graph is open.

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

from convray.workers.direct import DirectAddress, DirectChannel, DirectListener, new_token
from convray.workers.replica import ReplicaReply


@ray.remote
class Echo:
    """An actor whose method does nothing, so only the hop is measured."""

    def run(self, batch: np.ndarray) -> int:
        """The batch's size: the least an answer can carry."""
        return batch.shape[0]

    def reply(self, batch: np.ndarray) -> ReplicaReply:
        """What the direct channel carries back: one row of ten probabilities per image."""
        return ReplicaReply(np.zeros((batch.shape[0], 10), dtype=np.float32), 0.0, 0, 0)

    def open_direct_channel(self, token: bytes) -> DirectAddress:
        """Listen for direct-channel batches on loopback, as ``ModelRunner.open_direct_channel`` does."""
        self.listener = DirectListener(self.reply, token, "127.0.0.1", max_batch_bytes=1 << 20)
        return self.listener.direct_address


async def round_trips(call, batch: np.ndarray, calls: int) -> tuple[float, float]:
    """Median round trip in ms of ``calls`` awaited calls (the first tenth left out), and caller CPU ms per call."""
    times = []
    cpu_before = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        await call(batch)
        times.append(time.perf_counter() - started)
    cpu_ms = (time.process_time() - cpu_before) / calls * 1e3
    return round(statistics.median(times[calls // 10 :]) * 1e3, 3), round(cpu_ms, 3)


async def measure(calls: int) -> dict[str, float | None]:
    """Median round trips of ``calls`` plain calls and graph executions, and idle CPU with the graph open."""
    actor = Echo.remote()
    batch = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    await actor.run.remote(batch)
    plain_ms, plain_cpu_ms = await round_trips(lambda x: actor.run.remote(x), batch, calls)
    token = new_token()
    address = await actor.open_direct_channel.remote(token)
    tcp = DirectChannel((address.host, address.port), token)
    direct_ms, direct_cpu_ms = await round_trips(tcp, batch, calls)
    tcp.close()
    local_ms = local_cpu_ms = None
    if address.local is not None:
        local = DirectChannel(address, token)
        local_ms, local_cpu_ms = await round_trips(local, batch, calls)
        local.close()
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
        "plain_call_p50_ms": plain_ms,
        "plain_call_caller_cpu_ms": plain_cpu_ms,
        "direct_channel_p50_ms": direct_ms,
        "direct_channel_caller_cpu_ms": direct_cpu_ms,
        "direct_local_socket_p50_ms": local_ms,
        "direct_local_socket_caller_cpu_ms": local_cpu_ms,
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
