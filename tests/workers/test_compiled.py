"""CompiledRun's own bookkeeping, with a stand-in graph (no Ray): what happens to an execution whose caller
stops waiting. (tests/workers/test_pool.py runs real compiled graphs on Ray.)"""

import asyncio

import numpy as np

from convray.workers.compiled import CompiledRun
from convray.workers.replica import ReplicaReply


class StandInGraph:
    """Hands out one asyncio future per execution, as Ray's graph does; the test resolves them."""

    def __init__(self) -> None:
        self.executions: list[asyncio.Future] = []

    async def execute_async(self, pixels: np.ndarray) -> asyncio.Future:
        self.executions.append(asyncio.get_running_loop().create_future())
        return self.executions[-1]


def compiled_run(graph: StandInGraph) -> CompiledRun:
    run = CompiledRun.__new__(CompiledRun)  # as __init__ leaves it, with the graph compiled
    run._graph, run._actor, run._pid, run._probe_after_s = graph, None, 1, 60.0
    run._broken, run._abandoned = asyncio.Event(), set()
    return run


async def test_a_cancelled_caller_leaves_its_execution_for_rays_reader_to_resolve():
    """Ray's reader resolves every execution's future in turn; one cancelled under it stops the reader for good."""
    graph = StandInGraph()
    run = compiled_run(graph)
    first = asyncio.ensure_future(run(np.zeros((1, 1, 8, 8), np.uint8)))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert not graph.executions[0].cancelled()
    graph.executions[0].set_result(ReplicaReply(np.zeros((1, 10), np.float32), 0.0, 0, 0))  # the reader's turn
    second = asyncio.ensure_future(run(np.zeros((1, 1, 8, 8), np.uint8)))
    await asyncio.sleep(0.01)
    graph.executions[1].set_result(ReplicaReply(np.ones((1, 10), np.float32), 0.0, 0, 0))
    assert (await second).probabilities.tolist() == [[1.0] * 10]
    await asyncio.sleep(0)
    assert not run._abandoned and not run.broken
