"""The model registry: loads and unloads finish even when their caller gives up, and a newly published
version is picked up while serving (models.poll_interval_s, issue #8)."""

import asyncio
import shutil
import threading
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from convray.service.batching import Batcher
from convray.service.config import BatchingSettings, WorkerSettings
from convray.service.errors import ModelNotFound, ModelNotReady
from convray.service.metrics import Metrics
from convray.service.registry import ModelRegistry, ServedModel
from convray.service.statistics import ModelStatistics
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from convray.workers.repository import ModelRepository
from tests.conftest import SHIPPED_MODELS, ServerThread, digit_png, server_settings


class StoppablePool:
    """Stands in for a version's ReplicaPool: records whether its replicas were stopped."""

    size = 1
    stopped = abandoned = False
    not_serving = None

    def replica_name(self, index: int) -> str:
        return f"digits-1-{index}"

    async def wait_idle(self, timeout_s: float) -> bool:
        return True

    def shutdown(self) -> None:
        self.stopped = True

    def abandon(self, stop_replicas: bool = False) -> None:
        self.abandoned, self.killed = True, stop_replicas


def registry_serving_a_held_batch() -> tuple[ModelRegistry, StoppablePool, Batcher, asyncio.Event]:
    """A registry serving digits version 1 whose batches run only once the returned gate is opened."""
    gate = asyncio.Event()

    async def run_batch(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    registry = ModelRegistry(
        ModelRepository(SHIPPED_MODELS), "digits", BatchingSettings(), WorkerSettings(), Metrics(CollectorRegistry())
    )
    batcher = Batcher(run_batch, max_batch_size=1, max_batch_wait_s=0.0, max_queue=8, max_concurrent_batches=1)
    batcher.start()
    pool = StoppablePool()
    registry._served["digits"] = {1: ServedModel("digits", 1, None, pool, batcher, ModelStatistics())}
    return registry, pool, batcher, gate


async def test_an_unload_whose_caller_gave_up_still_answers_the_queue_and_stops_the_replicas():
    """RepositoryModelUnload with a deadline shorter than the drain: gRPC cancels the handler mid-drain."""
    registry, pool, batcher, gate = registry_serving_a_held_batch()
    running, queued = asyncio.ensure_future(batcher.submit(1)), asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.02)
    unloading = asyncio.ensure_future(registry.unload("digits"))
    await asyncio.sleep(0.02)
    unloading.cancel()  # the client's deadline passed
    await asyncio.gather(unloading, return_exceptions=True)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(running, queued), 2) == [1, 2]
    await registry.close()  # waits for the unload, still under way
    assert pool.stopped and registry.loaded_versions("digits") == []


@pytest.mark.parametrize("stop_replicas", [False, True])
async def test_abandoning_after_ray_was_lost_lets_go_of_the_replicas_and_stops_them_when_asked(stop_replicas):
    """A rejoin leaves the old session, which ends the replicas with it; a reload in the same session must stop
    them, or those only slow to answer live on holding their CPUs (found in review)."""
    registry, pool, _, gate = registry_serving_a_held_batch()
    gate.set()
    await registry.abandon_all(stop_replicas=stop_replicas)
    assert pool.abandoned and pool.killed == stop_replicas and not pool.stopped  # nothing waits on the lost cluster
    assert registry.served_versions() == [] and not registry.ready


async def test_a_switch_whose_old_version_was_abandoned_meanwhile_ends_without_an_error():
    """Found in review: Ray lost during a version switch's grace period abandoned every version, and the switch
    then failed with KeyError unloading the old one (logged by the poller as unexpected, with a traceback)."""
    registry, pool, _, gate = registry_serving_a_held_batch()
    gate.set()
    await registry.abandon_all()
    await registry._unload_version("digits", 1)  # where the switch goes on after its grace period
    assert pool.abandoned and not pool.stopped


async def test_closing_gives_running_batches_the_time_left_then_fails_them_and_stops_the_replicas():
    """Found in review: a server told to stop waited for ever on a batch its stuck replica held."""
    registry, pool, batcher, _gate = registry_serving_a_held_batch()  # the gate never opens: a stuck batch
    # A second, healthy model closes beside it and is not aborted (before, models closed one after another
    # and those after the stuck one got no time at all).
    healthy_batcher = Batcher(lambda items: asyncio.sleep(0.1, result=items), max_batch_size=1,
                              max_batch_wait_s=0.0, max_queue=8, max_concurrent_batches=1)  # fmt: skip
    healthy_batcher.start()
    healthy_pool = StoppablePool()
    registry._served["zeta"] = {1: ServedModel("zeta", 1, None, healthy_pool, healthy_batcher, ModelStatistics())}
    running = asyncio.ensure_future(batcher.submit(1))
    healthy = asyncio.ensure_future(healthy_batcher.submit(7))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    await asyncio.wait_for(registry.close(timeout_s=0.3), 5)
    assert 0.25 < time.monotonic() - started < 2 and pool.stopped and healthy_pool.stopped
    with pytest.raises(
        ModelNotReady, match="the server stopped before this request's batch of digits came back; retry"
    ):
        await running
    assert await healthy == 7


async def test_a_load_that_fails_after_its_caller_gave_up_is_logged(model_repo, caplog):
    """Found in review: with the RPC's caller gone, a failed RepositoryModelLoad left no line in the log."""
    registry = ModelRegistry(
        ModelRepository(model_repo), "digits", BatchingSettings(), WorkerSettings(), Metrics(CollectorRegistry())
    )
    registry.ready = True
    gate = asyncio.Event()

    async def load_latest(name: str) -> None:
        await gate.wait()
        raise RuntimeError("no room for the replicas")

    registry._load_latest = load_latest
    loading = asyncio.ensure_future(registry.load_latest("digits"))
    await asyncio.sleep(0.02)
    loading.cancel()  # the client's deadline passed
    await asyncio.gather(loading, return_exceptions=True)
    gate.set()
    await asyncio.sleep(0.05)
    assert "loading 'digits' failed after its caller stopped waiting: no room for the replicas" in caplog.text


def registry_with_a_new_version_on_disk(model_repo) -> tuple[ModelRegistry, list[str]]:
    """A registry serving digits version 1 (a stand-in) with version 2 on disk; its loads are recorded, not run."""
    shutil.copytree(model_repo / "digits" / "1", model_repo / "digits" / "2")
    registry = ModelRegistry(
        ModelRepository(model_repo), "digits", BatchingSettings(), WorkerSettings(), Metrics(CollectorRegistry())
    )
    registry._served["digits"] = {1: ServedModel("digits", 1, None, StoppablePool(), None, ModelStatistics())}
    registry.ready = True
    loads: list[str] = []

    async def load_latest(name: str) -> None:
        loads.append(name)

    registry._load_latest = load_latest
    return registry, loads


async def test_the_poller_starts_no_load_while_ray_is_lost_or_the_models_load_again(model_repo):
    """Found in review: after a lost Ray's models were forgotten, the poller loaded them on the dead cluster, with
    a blocking Ray call on the event loop; the server froze, and Ray ended the process a minute later."""
    registry, loads = registry_with_a_new_version_on_disk(model_repo)
    registry.ray_lost = True
    registry.start_polling(0.02)
    await asyncio.sleep(0.15)
    registry.ray_lost, registry.ready = False, False  # back, and loading again (recovery)
    await asyncio.sleep(0.15)
    assert loads == []
    registry.ready = True
    await asyncio.sleep(0.15)
    assert loads[:1] == ["digits"]
    registry._poller.cancel()


async def test_the_poller_logs_an_unexpected_failure_and_goes_on_polling(model_repo, caplog):
    """Before, any exception but a load error ended the poller for good, without a word."""
    registry, loads = registry_with_a_new_version_on_disk(model_repo)
    attempts = []

    async def load_latest(name: str) -> None:
        attempts.append(name)
        if len(attempts) == 1:
            raise RecursionError("maximum recursion depth exceeded")
        loads.append(name)

    registry._load_latest = load_latest
    registry.start_polling(0.02)
    await asyncio.sleep(0.5)  # the retry comes after 2 intervals
    registry._poller.cancel()
    assert loads[:1] == ["digits"] and len(attempts) >= 2
    assert "not switching to digits version 2: RecursionError: maximum recursion depth exceeded" in caplog.text


async def test_a_model_unloaded_by_request_stays_unloaded_until_a_load_is_requested(model_repo):
    """Before, the poller loaded it again within one interval, undoing the operator's RepositoryModelUnload."""
    registry, loads = registry_with_a_new_version_on_disk(model_repo)
    registry._served = registry_serving_a_held_batch()[0]._served  # a version with a real batcher to close
    await registry.unload("digits")
    registry.start_polling(0.02)
    await asyncio.sleep(0.15)
    assert loads == [] and registry.loaded_versions("digits") == []
    await registry.load_latest("digits")  # RepositoryModelLoad
    await asyncio.sleep(0.1)
    assert loads[0] == "digits"
    registry._poller.cancel()


async def test_an_unload_lets_calls_outside_the_batcher_finish_before_it_stops_the_replicas():
    """Explain calls go to the replicas directly; an unload stopped them mid-call (UNAVAILABLE, ActorDiedError)."""
    registry, pool, _, _ = registry_serving_a_held_batch()
    explain_done = asyncio.Event()

    async def wait_idle(timeout_s: float) -> bool:
        await explain_done.wait()
        return True

    pool.wait_idle = wait_idle
    unloading = asyncio.ensure_future(registry.unload("digits"))
    await asyncio.sleep(0.1)
    assert not pool.stopped and not unloading.done()
    explain_done.set()
    await asyncio.wait_for(unloading, 2)
    assert pool.stopped


async def test_the_default_model_is_the_configured_one_or_the_only_model_of_the_repository(caplog):
    def chosen(*listings: list[str]) -> str:
        registry = registry_serving_a_held_batch()[0]  # configured with --default-model digits
        for names in listings:  # each load of every model (at start, after a lost Ray) lists the repository
            registry.choose_default_model(names)
        return registry.default_model

    assert chosen(["cats", "digits"]) == "digits"
    assert chosen(["flowers"]) == "flowers"  # a repository of one model needs no flag
    assert chosen(["cats", "flowers"]) == "digits"  # no guess among several
    assert "the default model 'digits' is not in the repository (models: cats, flowers)" in caplog.text
    # Chosen once, from the first listing with a model: a model published later does not move it (review).
    assert chosen([], ["flowers"], ["cats", "flowers"]) == "flowers"


async def test_requests_naming_no_model_are_refused_while_the_default_is_not_served_not_given_another_model():
    """Before, a default model that failed to load or was unloaded handed its requests to the first other model by
    name, which answered them with its own classes."""
    registry = registry_serving_a_held_batch()[0]
    cats = registry._served.pop("digits")  # only another model is served
    registry._served["cats"] = cats
    registry.choose_default_model(["cats", "digits"])
    registry.ready = True
    assert registry.resolve("cats", 0) is cats[1]
    with pytest.raises(ModelNotFound) as refused:
        registry.resolve("", 0)
    assert str(refused.value) == (
        "the request names no model, and the default model 'digits' is not served (--default-model); name one of "
        "the served models: ['cats']"
    )
    assert registry.metric_label("") == "digits"  # counted under the model asked for, as before


async def test_a_name_longer_than_any_model_can_have_is_not_served_and_never_hashed():
    """Found in review: a Classify may name its model in megabytes; each lookup hashed the whole name again."""
    registry = registry_serving_a_held_batch()[0]
    registry.ready = True

    class Unhashable(str):
        def __hash__(self):
            raise AssertionError("hashed")

    long_name = Unhashable("d" * 65)
    assert registry.metric_label(long_name) == "(unknown)"
    with pytest.raises(ModelNotFound, match=r"^model 'ddd.*' is not served; served models: \['digits'\]$"):
        registry.resolve(long_name, 0)
    assert registry.resolve("digits", 0) is registry._served["digits"][1]


def registry_on(model_repo, **workers) -> ModelRegistry:
    """A real registry on ``model_repo``: its loads start replicas on the test's Ray."""
    settings = WorkerSettings(**{"replicas": 1, "cpus_per_replica": 0.25, **workers})
    return ModelRegistry(
        ModelRepository(model_repo), "digits", BatchingSettings(), settings, Metrics(CollectorRegistry())
    )


@pytest.mark.integration
async def test_a_broken_highest_version_at_start_falls_back_to_the_one_below(ray_address, model_repo):
    """Before, a restart after a bad publish loaded nothing and exited 1 (a crash loop), though version 1 was fine."""
    broken = model_repo / "digits" / "2"
    shutil.copytree(model_repo / "digits" / "1", broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    registry = registry_on(model_repo)
    errors = await registry.load_latest_of_each()
    try:
        assert registry.ready and registry.loaded_versions("digits") == [1]
        assert len(errors) == 1 and "model.safetensors" in errors[0]
    finally:
        await registry.close()


@pytest.mark.integration
async def test_replicas_that_cannot_be_placed_at_start_do_not_fall_back_to_wait_again_per_version(
    ray_address, model_repo
):
    """The cluster is short, not the version: each fallback would wait --replica-start-timeout-s again, past the
    Kubernetes start-up probe (found in review)."""
    shutil.copytree(model_repo / "digits" / "1", model_repo / "digits" / "2")
    registry = registry_on(model_repo, cpus_per_replica=64, replica_start_timeout_s=2, ray_address=ray_address)
    errors = await registry.load_latest_of_each()
    assert not registry.ready
    assert len(errors) == 1 and "digits version 2 were not running after 2 s" in errors[0]


@pytest.mark.integration
async def test_closing_cancels_a_load_still_waiting_for_its_replicas(ray_address, model_repo):
    """Before, a stop waited for it up to --replica-start-timeout-s (600 s by default), far past any drain grace."""
    # Joined, not embedded: no up-front refusal, the replica waits to be placed (as if for a node to join).
    registry = registry_on(model_repo, cpus_per_replica=64, replica_start_timeout_s=300, ray_address=ray_address)
    registry.ready = True
    loading = asyncio.ensure_future(registry.load_latest("digits"))
    await asyncio.sleep(1.0)
    assert not loading.done()
    await asyncio.wait_for(registry.close(), 15)
    with pytest.raises(asyncio.CancelledError):
        await loading


@pytest.fixture
def polling_server(ray_address, model_repo):
    server = ServerThread(server_settings(model_repo, models__poll_interval_s=0.2, workers__replicas=1)).start()
    yield server, model_repo
    server.stop()


@pytest.mark.integration
def test_a_published_version_is_loaded_warmed_and_switched_to_with_no_failed_request(polling_server):
    """Clients keep classifying (latest version, and version 1 by name) while version 2 appears on disk:
    every request succeeds, latest-version requests move from 1 to 2, and the poller then retires 1."""
    server, repo = polling_server
    _, held_out = load_digits_split()
    png = digit_png(held_out.images[0])
    versions_served: dict[int, list[int]] = {}  # per latest-version client, in the order it sent them
    failures: list[grpc.RpcError] = []
    stop = threading.Event()

    def client(client_id: int, version: int) -> None:
        served = versions_served.setdefault(client_id, []) if version == 0 else []
        with grpc.insecure_channel(server.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            while not stop.is_set():
                try:
                    reply = stub.Classify(pb.ClassifyRequest(image=png, version=version), timeout=30)
                except grpc.RpcError as exc:
                    if version == 0 or exc.code() != grpc.StatusCode.NOT_FOUND:  # v1 by name: until retired
                        failures.append(exc)
                    continue
                if version == 0:
                    served.append(reply.version)

    clients = [threading.Thread(target=client, args=(i, v)) for i, v in enumerate((0, 0, 0, 1))]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    staging = repo / "digits" / ".staging-2"
    shutil.copytree(repo / "digits" / "1", staging)
    staging.rename(repo / "digits" / "2")  # published atomically, as ModelRepository.publish does
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and server.server.registry.loaded_versions("digits") != [2]:
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for thread in clients:
        thread.join(30)

    assert server.server.registry.loaded_versions("digits") == [2]
    assert not failures, [f"{f.code()}: {f.details()}" for f in failures[:3]]
    # Each client sends its next request only after the previous reply, so within one client the order is
    # causal; across clients it is not (a v1 request sent just before the switch may finish after another
    # client's first v2 reply).
    assert len(versions_served) == 3
    for served in versions_served.values():
        assert served[0] == 1 and served[-1] == 2
        switch = served.index(2)
        assert set(served[switch:]) == {2}, "once a client got version 2, its latest-version requests never go back"


@pytest.mark.integration
def test_a_broken_new_version_leaves_the_served_one_in_place(polling_server):
    server, repo = polling_server
    broken = repo / "digits" / "2"
    shutil.copytree(repo / "digits" / "1", broken)
    (broken / "model.safetensors").write_bytes(b"corrupt")
    time.sleep(2.0)
    assert server.server.registry.loaded_versions("digits") == [1]
    with grpc.insecure_channel(server.address) as channel:
        _, held_out = load_digits_split()
        reply = classifier_pb2_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=digit_png(held_out.images[0])), timeout=30
        )
    assert reply.version == 1


@pytest.mark.integration
def test_a_new_version_that_failed_to_load_is_tried_again_and_served_once_it_loads(polling_server, caplog):
    """A failure may pass (a copy still being written, no room yet for the new replicas). Before, the poller never
    tried that version again: a front end kept the old one for good, and in a --frontends group others did not."""
    server, repo = polling_server
    staged, version = repo / "digits" / ".staged", repo / "digits" / "2"
    shutil.copytree(repo / "digits" / "1", staged)
    weights = (staged / "model.safetensors").read_bytes()
    (staged / "model.safetensors").write_bytes(b"not written yet")
    staged.rename(version)  # appears at once, broken
    deadline = time.monotonic() + 60
    while "not switching to digits version 2" not in caplog.text:  # a replica read the broken file
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.server.registry.loaded_versions("digits") == [1]
    (version / "model.safetensors").write_bytes(weights)
    while server.server.registry.loaded_versions("digits") != [2]:
        assert time.monotonic() < deadline, server.server.registry.loaded_versions("digits")
        time.sleep(0.1)


def test_the_worker_settings_a_replica_runs_with_reach_the_registry_s_replica_options():
    workers = WorkerSettings(
        device="cuda", gpus_per_replica=0.5, amp="bf16", graph="eager", cuda_graphs=True, transport="actor-call"
    )
    registry = ModelRegistry(
        ModelRepository(SHIPPED_MODELS),
        "digits",
        BatchingSettings(max_batch_size=12),
        workers,
        Metrics(CollectorRegistry()),
    )
    options = registry._replica_options
    assert (options.device, options.gpus_per_replica, options.amp, options.graph) == ("cuda", 0.5, "bf16", "eager")
    assert options.cuda_graphs is True and options.transport == "actor-call" and options.max_batch_size == 12
