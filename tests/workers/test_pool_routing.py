"""ReplicaPool's choice of replica, without Ray: stand-in actor handles whose calls answer or fail at once.

(tests/workers/test_pool.py drives the same pool over real Ray actors and every transport.)
"""

import asyncio

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from convray.workers import pool as pool_module
from convray.workers.direct import DirectListener, ReplicaUnreachable
from convray.workers.pool import ReplicaPool
from convray.workers.replica import ReplicaReply

BATCH = np.zeros((1, 1, 8, 8), np.uint8)


class StandInActor:
    """An actor handle whose ``run`` and ``describe`` answer after 1 ms, or raise ActorDiedError while ``dead``
    (what Ray answers for an actor that has used up its restarts)."""

    def __init__(self, dead: bool = False, direct_address: tuple[str, int] | None = None) -> None:
        self.dead, self.runs, self.direct_address = dead, 0, direct_address

    class _Method:
        def __init__(self, call) -> None:
            self._call = call

        def remote(self, *args):
            async def answer():
                await asyncio.sleep(0.001)
                return self._call(*args)

            return answer()

    def _alive(self) -> None:
        if self.dead:
            raise ActorDiedError()

    def _run(self, pixels: np.ndarray) -> ReplicaReply:
        self._alive()
        self.runs += 1
        return ReplicaReply(np.zeros((len(pixels), 10), np.float32), 0.0, 0, 0)

    def _describe(self) -> dict:
        self._alive()
        return {"pid": 1, "input_shape": [1, 8, 8]}

    @property
    def run(self):
        return self._Method(self._run)

    @property
    def describe(self):
        return self._Method(self._describe)

    @property
    def open_direct_channel(self):
        return self._Method(lambda token: self.direct_address)


@pytest.fixture(autouse=True)
def no_ray_kill(monkeypatch):
    monkeypatch.setattr(pool_module.ray, "kill", lambda actor, no_restart=True: None)


async def test_replicas_that_stay_dead_stop_drawing_batches_after_their_first_failure():
    actors = [StandInActor(dead=True), StandInActor(dead=True), StandInActor()]
    failures = []
    pool = ReplicaPool("digits", 1, actors, on_failure=lambda: failures.append(1))
    outcomes = [await asyncio.gather(pool.predict(BATCH), return_exceptions=True) for _ in range(30)]
    assert sum(isinstance(o[0], Exception) for o in outcomes) <= 1  # at most one batch met both dead ones
    assert actors[2].runs >= 29 and len(failures) <= 2  # each dead replica failed once, then was left alone
    pool.shutdown()


async def test_a_death_is_counted_once_as_a_loss_however_many_batches_in_flight_found_it():
    """Found in review: the alert on repeated deaths counted failed batches, so one death with a few batches in
    flight (a worker pod drained) paged as a crash loop."""
    actors = [StandInActor(), StandInActor()]
    failures, losses = [], []
    pool = ReplicaPool("digits", 1, actors, on_failure=lambda: failures.append(1), on_lost=lambda: losses.append(1))
    actors[0].dead = True
    await asyncio.gather(*(pool.predict(BATCH) for _ in range(4)))  # two of them in flight on the dead one
    assert len(failures) == 2 and len(losses) == 1
    actors[0].dead = False  # Ray restarted it; the background probe finds it answering
    await asyncio.sleep(0.7)
    actors[0].dead = True  # and it dies again: a second loss
    await asyncio.gather(*(pool.predict(BATCH) for _ in range(4)))
    assert len(losses) == 2
    pool.shutdown()


async def test_a_replica_that_answers_again_gets_batches_again():
    actors = [StandInActor(dead=True), StandInActor()]
    pool = ReplicaPool("digits", 1, actors)
    for _ in range(4):
        await pool.predict(BATCH)
    assert actors[0].runs == 0
    actors[0].dead = False  # Ray restarted it; the background probe finds it answering
    await asyncio.sleep(0.7)
    for _ in range(4):
        await pool.predict(BATCH)
    assert actors[0].runs == 2 and actors[1].runs == 6  # round-robin again
    pool.shutdown()


async def test_a_fast_path_whose_warm_up_batch_fails_leaves_the_replica_on_plain_calls():
    """E.g. a moment without GPU memory: the load goes on (before, the error escaped and failed it)."""

    def run(pixels: np.ndarray) -> ReplicaReply:
        raise RuntimeError("CUDA out of memory")

    actor = StandInActor()
    pool = ReplicaPool("digits", 1, [actor], transport="direct")
    listener = DirectListener(run, pool._token, "127.0.0.1", max_batch_bytes=1 << 20)
    actor.direct_address = listener.address
    try:
        await pool._open_fast_path(0, {"pid": 1, "input_shape": [1, 8, 8]})
        assert pool.fast() == [False]
        await pool.predict(BATCH)  # by a plain actor call
        assert actor.runs == 1
    finally:
        listener.close()
        pool.shutdown()


async def test_a_batch_or_explain_call_for_an_unloaded_version_is_replica_unreachable():
    pool = ReplicaPool("digits", 1, [StandInActor(), StandInActor()])
    pool.shutdown()  # the version was unloaded after the request resolved it
    with pytest.raises(ReplicaUnreachable, match="digits version 1 was unloaded"):
        await pool.predict(BATCH)
    with pytest.raises(ReplicaUnreachable, match="was unloaded"):
        await pool.explain(np.zeros((1, 8, 8), np.uint8), None, 1)


class RestartNeverPlaced(StandInActor):
    """An actor lost once whose restart Ray can never place: its first call fails, and later calls (``run`` and
    ``describe``) wait for ever, as Ray holds calls to an actor it is restarting."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = False

    @property
    def run(self):
        actor = self

        class Run:
            def remote(self, pixels):
                async def call():
                    if actor.lost:
                        await asyncio.Event().wait()
                    actor.lost = True
                    raise ActorDiedError()

                return call()

        return Run()

    @property
    def describe(self):
        class Waits:
            def remote(self):
                return asyncio.Event().wait()  # queued behind a restart that never happens

        return Waits()


async def test_a_lone_replicas_lost_batch_waits_for_its_restart_only_so_long_then_fails_unavailable(monkeypatch):
    """Found in review: with one replica whose restart never came, the retry and the probe waited for ever, so
    batches held their slots and every later request was refused for overload while the version looked ready."""
    monkeypatch.setattr(pool_module, "LONE_RETRY_WAIT_S", 0.5)
    replacement = StandInActor()
    pool = ReplicaPool("digits", 1, [RestartNeverPlaced()], start_replica=lambda: replacement, start_timeout_s=2.0)
    with pytest.raises(ReplicaUnreachable, match="not running again after 0.5 s; retry"):
        await asyncio.wait_for(pool.predict(BATCH), 5)
    # A later batch finds no well replica: it waits as boundedly, not for ever on the restarting actor.
    with pytest.raises(ReplicaUnreachable, match="not running again after 0.5 s; retry"):
        await asyncio.wait_for(pool.predict(BATCH), 5)
    for _ in range(100):  # the probe gives up after the start timeout and a new replica takes the place
        if pool.actors == [replacement] and pool.serving == 1:
            break
        await asyncio.sleep(0.05)
    assert pool.actors == [replacement] and pool.serving == 1
    assert (await asyncio.wait_for(pool.predict(BATCH), 5)).probabilities.shape == (1, 10)
    pool.shutdown()


@pytest.mark.parametrize("stop_replicas", [False, True])
async def test_letting_go_of_a_lost_clusters_replicas_waits_on_nothing_and_kills_them_when_asked(
    monkeypatch, stop_replicas
):
    """A compiled graph's teardown (its finaliser's too) waits up to a minute on its actors, on the event loop:
    abandoned, it is kept unclosed; a direct channel is just closed (found in review)."""
    from convray.workers.compiled import CompiledRun

    closed, killed = [], []

    class Graph(CompiledRun):
        def __init__(self) -> None:  # no Ray: only what abandon looks at
            pass

        def close(self) -> None:
            closed.append(self)

    class Channel:
        def close(self) -> None:
            closed.append(self)

    monkeypatch.setattr(pool_module.ray, "kill", lambda actor, no_restart: killed.append(actor))
    actors = [StandInActor(), StandInActor()]
    pool = ReplicaPool("digits", 1, actors)
    graph, channel = Graph(), Channel()
    pool._fast_paths = [graph, channel]
    probe = pool._probes[0] = asyncio.ensure_future(asyncio.sleep(10))
    pool.abandon(stop_replicas)
    await asyncio.sleep(0)
    assert closed == [channel] and graph in pool_module._UNCLOSED_GRAPHS
    assert killed == (actors if stop_replicas else [])
    assert probe.cancelled() and pool.size == 0


class GpuReplicaOpByOp(StandInActor):
    """A replica on a GPU whose CUDA graph capture failed: ``describe`` says it runs its forward op by op."""

    def _describe(self) -> dict:
        return super()._describe() | {"device": "cuda", "cuda_graphs": False}


@pytest.mark.parametrize("asked", [True, False])
async def test_a_gpu_replica_back_in_service_without_its_cuda_graphs_is_logged_when_they_were_asked_for(caplog, asked):
    """At load the front end warns of a GPU replica running op by op under --cuda-graphs; a restarted or replaced
    one whose capture failed must be warned of too (it came back slower, with nothing said)."""
    restarted = GpuReplicaOpByOp(dead=True)
    pool = ReplicaPool("digits", 1, [restarted, StandInActor()], cuda_graphs=asked)
    await asyncio.wait_for(pool.predict(BATCH), 5)  # replica 0 is found lost; its batch is retried on replica 1
    assert pool.serving == 1
    with caplog.at_level("WARNING", logger=pool_module.__name__):
        restarted.dead = False  # Ray has restarted it
        for _ in range(100):
            if pool.serving == 2:
                break
            await asyncio.sleep(0.05)
    assert pool.serving == 2
    warned = [r.getMessage() for r in caplog.records if "--cuda-graphs is on" in r.getMessage()]
    expected = (
        "replica digits-0 of version 1: --cuda-graphs is on but it runs its forward pass op by op on its GPU: its "
        "capture failed (the replica's log says why)"
    )
    assert warned == ([expected] if asked else [])
    pool.shutdown()
