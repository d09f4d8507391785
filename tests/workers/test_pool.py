"""ReplicaPool on a real local Ray: every transport (plain actor calls, direct TCP channels, compiled
graphs) gives the same answers, and a fast path whose replica dies is dropped, its batch retried
elsewhere, and the path opened again once Ray has restarted the replica."""

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray

from convray.workers import pool as pool_module
from convray.workers.data import load_digits_split
from convray.workers.pool import REPLICA_LOST, ReplicaOptions, ReplicaPool, ReplicasNotPlaced
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


@pytest.mark.parametrize("transport", ["direct", "compiled-graph"])
async def test_a_fast_path_gives_the_same_probabilities_as_a_plain_call(model_repo, batch, transport):
    plain = await ReplicaPool.start(str(model_repo), "digits", 1, options(transport="actor-call"))
    fast = await ReplicaPool.start(str(model_repo), "digits", 1, options(transport=transport))
    try:
        assert plain.fast() == [False] and fast.fast() == [True]
        by_call, by_fast_path = await plain.predict(batch), await fast.predict(batch)
        assert by_fast_path.probabilities.shape == (16, 10)
        np.testing.assert_allclose(by_fast_path.probabilities, by_call.probabilities, atol=1e-6)
        assert by_fast_path.compute_s > 0
    finally:
        plain.shutdown()
        fast.shutdown()


@pytest.mark.parametrize("embedded", [True, False])
async def test_direct_listeners_stay_on_loopback_when_ray_is_embedded_and_use_the_nodes_address_otherwise(
    model_repo, batch, embedded
):
    """Found in review: with the default localhost bind and an embedded Ray, the replicas' direct listeners were on
    the machine's routable address, open to anyone on the network (at least to hold the 64 handshake slots)."""
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(fixed_cluster=embedded))
    try:
        (path,) = pool._fast_paths
        assert path.address[0] == ("127.0.0.1" if embedded else ray.util.get_node_ip_address())
        assert (await pool.predict(batch)).probabilities.shape == (16, 10)
    finally:
        pool.shutdown()


async def test_a_compiled_graphs_reply_is_copied_out_of_its_reusable_channel_buffer(model_repo, batch):
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(transport="compiled-graph"))
    try:
        assert (await pool.predict(batch)).probabilities.flags.writeable
    finally:
        pool.shutdown()


@pytest.mark.parametrize("transport", ["direct", "compiled-graph"])
async def test_concurrent_batches_and_explain_calls_share_a_fast_path_replica(model_repo, batch, transport):
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(transport=transport))
    try:
        batches = [pool.predict(batch[i : i + 4]) for i in range(0, 16, 4)]
        explained, *results = await asyncio.gather(pool.explain(batch[0], None, 1), *batches)
        expected = np.concatenate([r.probabilities for r in results])
        assert expected.shape == (16, 10)
        np.testing.assert_allclose(explained.explanation.probabilities, expected[0], atol=1e-5)
        assert pool.fast() == [True]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("transport", ["direct", "compiled-graph"])
async def test_a_killed_replica_loses_no_batch_and_gets_its_fast_path_back(model_repo, batch, transport, monkeypatch):
    torn_down_on_the_loop, loop_thread = [], threading.get_ident()
    teardown = pool_module.CompiledRun.teardown

    def teardown_and_record(path):  # a compiled graph to a dead replica took 2 s to tear down, on the event loop
        torn_down_on_the_loop.append(threading.get_ident() == loop_thread)
        teardown(path)

    monkeypatch.setattr(pool_module.CompiledRun, "teardown", teardown_and_record)
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=2, transport=transport))
    try:
        assert pool.fast() == [True, True]
        pid = (await pool.actors[0].describe.remote())["pid"]
        ray.kill(pool.actors[0], no_restart=False)  # as if the process died; Ray restarts it
        results = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(8))), timeout=60)
        # ray.kill returns before the process is gone, so the dying one may have answered all of those and its
        # broken fast path gone unnoticed (seen): more once Ray has restarted it, which replica 0's old path fails
        await restarted(pool.actors[0], pid)
        results += await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(8))), timeout=60)
        assert all(r.probabilities.shape == (16, 10) for r in results)
        deadline = time.monotonic() + 90
        while pool.fast() != [True, True] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert pool.fast() == [True, True]  # opened again to the restarted process
        if transport == "compiled-graph":
            assert torn_down_on_the_loop and not any(torn_down_on_the_loop)  # the old graph, in a thread
        again = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(4))), timeout=30)
        np.testing.assert_allclose(again[0].probabilities, results[0].probabilities, atol=1e-6)
    finally:
        pool.shutdown()


async def test_two_opens_of_one_replicas_fast_path_leave_one_path_and_close_the_one_to_its_earlier_life(
    model_repo, batch, monkeypatch
):
    """Found in review: a replica lost again while its fast path opened got a second open, which replaced the first
    path without closing it (a compiled graph left to Ray's finaliser). Opens now take turns; the second finds
    the path the first opened to the same process and keeps it, and a path to the replica's earlier life is closed."""
    opened = []

    class CountedChannel(pool_module.DirectChannel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(pool_module, "DirectChannel", CountedChannel)
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=1, transport="direct"))
    try:
        (earlier,) = opened
        pid = (await pool.actors[0].describe.remote())["pid"]
        os.kill(pid, signal.SIGKILL)  # no batch is sent, so the pool does not notice: the two opens below do
        await restarted(pool.actors[0], pid)
        described = await pool.actors[0].describe.remote()
        await asyncio.wait_for(asyncio.gather(*(pool._open_fast_path(0, described) for _ in range(2))), 60)
        assert len(opened) == 2 and pool._fast_paths == [opened[1]]  # one new path, held
        assert earlier.broken  # the path to the killed process, closed
        result = await asyncio.wait_for(pool.predict(batch), 30)
        assert result.probabilities.shape == (16, 10) and not result.retried
    finally:
        pool.shutdown()


async def restarted(actor, pid: int) -> None:
    """Return once ``actor`` answers from a process other than ``pid``; fail after 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.TimeoutError, *REPLICA_LOST):
            if (await asyncio.wait_for(actor.describe.remote(), 5))["pid"] != pid:
                return
        await asyncio.sleep(0.2)
    pytest.fail(f"the replica was not restarted within 60 s (still pid {pid})")


async def test_a_lone_replica_killed_loses_no_batch_its_retry_waits_for_the_restart(model_repo, batch):
    """Before, the retry went at once to the replica Ray was still restarting and failed (ActorUnavailableError)."""
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=1, transport="direct"))
    try:
        expected = (await pool.predict(batch)).probabilities
        os.kill((await pool.actors[0].describe.remote())["pid"], signal.SIGKILL)  # Ray restarts it
        results = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(4))), timeout=90)
        for result in results:
            np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("replicas", [2, 1])
async def test_a_stuck_replica_is_restarted_after_the_batch_timeout_and_its_batches_are_answered(
    model_repo, batch, replicas
):
    """Found in review: a replica alive but not answering (here SIGSTOP; a hung GPU or a deadlock alike) held its
    batches for ever, and requests without a deadline never got an answer. After --batch-timeout-s it is killed
    for Ray to restart, and its batches are retried: on the other replica, or on the restarted one when alone."""
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=replicas, batch_timeout_s=2))
    try:
        expected = (await pool.predict(batch)).probabilities
        pid = (await pool.actors[0].describe.remote())["pid"]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(pool.predict(batch) for _ in range(4))), timeout=90)
        for result in results:
            np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
        if replicas == 2:  # the batches sent to the stuck one waited the timeout, then went to the other
            assert time.monotonic() - started < 30 and {r.replica for r in results if r.retried} == {"digits-1"}
        deadline = time.monotonic() + 90
        while True:  # a new process in the stopped one's place
            with contextlib.suppress(*REPLICA_LOST):  # Ray is restarting it
                if (await asyncio.wait_for(pool.actors[0].describe.remote(), 60))["pid"] != pid:
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        pool.shutdown()


async def test_a_replica_ray_will_not_restart_is_replaced_by_a_new_one(model_repo, batch):
    """Found in review: with its restarts used up (here none allowed), a lone replica's version stayed loaded and
    every batch failed (ActorDiedError), for good."""
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=1, max_restarts=0))
    try:
        expected = (await pool.predict(batch)).probabilities
        first = pool.actors[0]
        os.kill((await first.describe.remote())["pid"], signal.SIGKILL)
        result = await asyncio.wait_for(pool.predict(batch), timeout=90)  # waits for the replacement
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
        assert pool.actors[0] != first
        deadline = time.monotonic() + 30
        while pool.fast() != [True] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pool.fast() == [True]  # the new replica has its direct channel too
    finally:
        pool.shutdown()


async def test_a_version_whose_replacement_cannot_start_says_it_is_not_serving_and_serves_once_one_starts(
    model_repo, batch, monkeypatch
):
    """Found in review: a replacement that failed was never tried again, and the version, with no replica left,
    still looked ready while every batch went to its dead replica."""
    monkeypatch.setattr(pool_module, "REPLACE_RETRY_S", (0.5, 1.0))
    pool = await ReplicaPool.start(str(model_repo), "digits", 1, options(replicas=1, max_restarts=0))
    version_dir, moved = model_repo / "digits" / "1", model_repo / "elsewhere"
    try:
        expected = (await pool.predict(batch)).probabilities
        assert pool.not_serving is None
        version_dir.rename(moved)  # a new replica cannot load the version now
        os.kill((await pool.actors[0].describe.remote())["pid"], signal.SIGKILL)
        with pytest.raises(REPLICA_LOST):
            await asyncio.wait_for(pool.predict(batch), timeout=90)  # its retry waited for the replacement
        assert "digits version 1 has no running replica" in pool.not_serving
        assert pool.serving == 0  # what the convray_replicas gauge shows
        moved.rename(version_dir)
        deadline = time.monotonic() + 60
        while pool.not_serving is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert pool.not_serving is None  # tried again in the background, and this time it started
        assert pool.serving == 1
        result = await asyncio.wait_for(pool.predict(batch), timeout=30)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    finally:
        pool.shutdown()


async def test_replicas_ray_cannot_place_fail_the_load_with_a_clear_error_instead_of_waiting_forever(model_repo):
    too_big = options(cpus_per_replica=1000, start_timeout_s=3)
    with pytest.raises(ModelLoadError, match=r"not running after 3 s; each asks Ray for 1000 CPU.*free"):
        await asyncio.wait_for(ReplicaPool.start(str(model_repo), "digits", 1, too_big), timeout=30)


async def test_on_a_cluster_no_node_can_join_replicas_that_can_never_fit_fail_before_waiting(model_repo):
    # The whole test Ray has 4 CPUs; the message is the up-front check's, not the timeout's.
    with pytest.raises(
        ModelLoadError, match=r"3 replica\(s\) .* ask Ray for 6 CPU in all \(2 each\) and this Ray has 4"
    ):
        await ReplicaPool.start(
            str(model_repo), "digits", 1, options(fixed_cluster=True, replicas=3, cpus_per_replica=2)
        )
    # One GPU more than the machine has (none here; on a GPU machine, its count plus one).
    gpus = int(ray.cluster_resources().get("GPU", 0))
    message = rf"ask Ray for {gpus + 1} GPU in all \(1 each\) and this Ray has {gpus}, "
    with pytest.raises(ModelLoadError, match=message + (".*run on a machine with a GPU" if not gpus else "")):
        ask = options(fixed_cluster=True, replicas=gpus + 1, gpus_per_replica=1, device="cuda")
        await ReplicaPool.start(str(model_repo), "digits", 1, ask)


async def test_on_an_embedded_ray_gpus_other_replicas_hold_are_refused_at_once_not_waited_for(model_repo, monkeypatch):
    """A second model's replicas, or a new version's during a switch, asking for a GPU that others hold: found in
    a GPU lease, where the load waited out its start timeout and the message then blamed the CPUs."""
    monkeypatch.setattr(pool_module, "shortfall", lambda count, each: None)  # a machine with one GPU in all...
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0, "GPU": 0.25})  # ...three quarters held
    monkeypatch.setattr(pool_module, "GPU_RELEASE_WAIT_S", 0.5)  # what it waits for a stopped replica's GPU
    ask = options(fixed_cluster=True, replicas=1, gpus_per_replica=0.5, device="cuda")
    started = time.monotonic()
    with pytest.raises(ReplicasNotPlaced, match=r"ask Ray for 0.5 GPU in all \(0.5 each\) and 0.25 is free"):
        await ReplicaPool.start(str(model_repo), "digits", 1, ask)  # not placeable: older versions are not tried
    assert 0.5 <= time.monotonic() - started < 5


@pytest.mark.parametrize(
    "device,gpus,told",
    [("auto", 0, "cpu"), ("auto", 0.25, "auto"), ("cpu", 0.5, "cpu"), ("cuda", 1, "cuda")],
)
def test_a_replica_with_no_gpu_reserved_is_told_the_cpu_even_where_it_could_see_one(device, gpus, told):
    """Ray leaves CUDA_VISIBLE_DEVICES unset for an actor with num_gpus=0 (ray#54868), so on a GPU node `auto` put
    CPU-configured replicas on a GPU Ray had not reserved (found in review)."""
    assert pool_module.replica_device(options(device=device, gpus_per_replica=gpus)) == told


async def test_a_load_cancelled_by_a_stopping_server_leaves_no_replica_behind_and_logs_no_traceback(model_repo, caplog):
    free_before = ray.available_resources()["CPU"]
    loading = asyncio.create_task(ReplicaPool.start(str(model_repo), "digits", 1, options(cpus_per_replica=0.5)))
    await asyncio.sleep(0.05)  # the replica is asked for; starting its process and loading the model take longer
    assert not loading.done()
    loading.cancel()
    try:
        await loading
    except asyncio.CancelledError:
        pass  # not pytest.raises: its record of the exception would keep the load's futures from being collected
    else:
        pytest.fail("the load was not cancelled")
    del loading
    await asyncio.sleep(0.5)  # the cancelled futures' callbacks run
    gc.collect()  # asyncio logs a future's exception nobody took when the future is collected
    assert "exception was never retrieved" not in caplog.text
    # A replica left behind is placed within seconds and holds its 0.5 CPU for as long as this driver lives.
    cancelled_at = time.monotonic()
    while time.monotonic() - cancelled_at < 5 or ray.available_resources()["CPU"] < free_before:
        assert time.monotonic() - cancelled_at < 30, ray.available_resources()
        await asyncio.sleep(0.2)


def test_an_idle_replica_counts_only_once_every_batch_out_has_reached_its_replica():
    """A batch just formed is on no replica until its task runs: before, a full queue saw the replica it was about
    to take as idle, and every batch slot overlapped where the advisor said overlap does not pay (found in review)."""
    pool = ReplicaPool("digits", 1, [object(), object()])
    pool._in_flight = [2, 0]  # one replica holds two batches (stuck, say), the other none
    assert pool.has_idle_replica(batches_out=2)
    assert not pool.has_idle_replica(batches_out=3)  # the third is on its way to the idle one
    pool._unwell = {1}
    assert not pool.has_idle_replica(batches_out=2)  # a lost replica is not idle
