"""ReplicaPool on a real local Ray: plain actor calls and compiled graphs give the same answers, and a
compiled graph whose replica dies is dropped, its batch retried elsewhere, and the graph rebuilt."""

import asyncio
import time

import numpy as np
import pytest
import ray

from convray.workers.data import load_digits_split
from convray.workers.pool import ReplicaOptions, ReplicaPool
from convray.workers.repository import ModelLoadError

pytestmark = pytest.mark.usefixtures("ray_address")


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    _, held_out = load_digits_split()
    return held_out.images[:16]  # uint8 (16, 1, 8, 8)


def options(**overrides) -> ReplicaOptions:
    settings = {"replicas": 1, "cpus_per_replica": 0.25, "device": "cpu"}
    settings.update(overrides)
    return ReplicaOptions(**settings)


async def test_a_compiled_graph_gives_the_same_probabilities_as_a_plain_call(model_repo, batch):
    plain = await ReplicaPool.start(str(model_repo), "digits", 1, options())
    compiled = await ReplicaPool.start(str(model_repo), "digits", 1, options(compiled_graph=True))
    try:
        assert plain.compiled() == [False] and compiled.compiled() == [True]
        by_call, by_graph = await plain.predict(batch), await compiled.predict(batch)
        assert by_graph.probabilities.shape == (16, 10)
        np.testing.assert_allclose(by_graph.probabilities, by_call.probabilities, atol=1e-6)
        assert by_graph.probabilities.flags.writeable  # copied out of the channel's reusable buffer
    finally:
        plain.shutdown()
        compiled.shutdown()


async def test_concurrent_batches_and_explain_calls_share_a_compiled_replica(model_repo, batch):
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(compiled_graph=True))
    try:
        batches = [pool.predict(batch[i : i + 4]) for i in range(0, 16, 4)]
        explained, *results = await asyncio.gather(pool.explain(batch[0], None, 1), *batches)
        expected = np.concatenate([r.probabilities for r in results])
        assert expected.shape == (16, 10)
        np.testing.assert_allclose(explained.explanation.probabilities, expected[0], atol=1e-5)
        assert pool.compiled() == [True]
    finally:
        pool.shutdown()


async def test_a_killed_compiled_replica_loses_no_batch_and_gets_its_graph_back(model_repo, batch):
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=2, compiled_graph=True))
    try:
        assert pool.compiled() == [True, True]
        ray.kill(pool.actors[0], no_restart=False)  # as if the process died; Ray restarts it
        results = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(8))), timeout=60)
        assert all(r.probabilities.shape == (16, 10) for r in results)
        deadline = time.monotonic() + 90
        while pool.compiled() != [True, True] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert pool.compiled() == [True, True]  # recompiled to the restarted process
        again = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(4))), timeout=30)
        np.testing.assert_allclose(again[0].probabilities, results[0].probabilities, atol=1e-6)
    finally:
        pool.shutdown()


async def test_replicas_ray_cannot_place_fail_the_load_with_a_clear_error_instead_of_waiting_forever(model_repo):
    too_big = options(cpus_per_replica=1000, start_timeout_s=3)
    with pytest.raises(ModelLoadError, match=r"not running after 3 s; each asks Ray for 1000 CPU.*free"):
        await asyncio.wait_for(ReplicaPool.start(str(model_repo), "digits", 1, too_big), timeout=30)
