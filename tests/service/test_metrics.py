"""The /metrics endpoint of a real server after real traffic: every convray_* metric exists and moves.

The ``metered`` server waits 300 ms for a batch to fill and queues at most 8 images, so an OIP request
of 8 images is exactly one batch, and a request sent while it waits is refused for overload.
"""

import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from tests.conftest import SHIPPED_MODELS, ServerThread, server_settings
from tests.conftest import digit_png as png
from tests.deploy.tools import prometheus_binary, scrape, scrape_text

pytestmark = pytest.mark.integration
DIGITS = {"model": "digits", "version": "1"}


@pytest.fixture(scope="module")
def images():
    _, data = load_digits_split()
    return data.images


def oip_batch(images: np.ndarray) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[images.astype("<f4").tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    return request


@pytest.fixture(scope="module")
def channel(metered):
    with grpc.insecure_channel(metered.address) as ch:
        yield ch


def wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_classify_request_adds_one_to_its_counter_and_to_each_latency_histogram(metered, channel, images):
    port = metered.server.metrics_port
    ok = {"api": "native", "rpc": "Classify", "model": "digits", "code": "OK"}
    before = scrape(port)
    classifier_pb2_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=png(images[0])), timeout=10)
    after = scrape(port)
    assert after.value("convray_requests_total", **ok) == before.value("convray_requests_total", **ok) + 1
    latency = {"api": "native", "rpc": "Classify", "model": "digits"}
    assert after.value("convray_request_duration_seconds_count", **latency) == (
        before.value("convray_request_duration_seconds_count", **latency) + 1
    )
    # it waited for the 300 ms batch window: the end-to-end histogram saw more than 0.25 s
    assert after.value("convray_request_duration_seconds_bucket", **latency, le="0.25") == before.value(
        "convray_request_duration_seconds_bucket", **latency, le="0.25"
    )
    for histogram, labels in [
        ("convray_decode_duration_seconds_count", {"model": "digits"}),
        ("convray_queue_wait_seconds_count", DIGITS),
        ("convray_batch_call_duration_seconds_count", DIGITS),
        ("convray_model_compute_duration_seconds_count", DIGITS),
    ]:
        assert after.value(histogram, **labels) == before.value(histogram, **labels) + 1, histogram
    assert after.value("convray_in_flight_requests", api="native", model="digits") == 0


def test_an_oip_batch_of_8_is_one_batch_in_the_8_bucket_with_a_quarter_fill(metered, channel, images):
    port = metered.server.metrics_port
    before = scrape(port)
    oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(oip_batch(images[:8]), timeout=10)
    after = scrape(port)

    def moved(name, **labels):
        return after.value(name, **DIGITS, **labels) - before.value(name, **DIGITS, **labels)

    assert moved("convray_batch_size_count") == 1
    assert moved("convray_batch_size_bucket", le="4.0") == 0
    assert moved("convray_batch_size_bucket", le="8.0") == 1
    assert moved("convray_batch_size_sum") == 8
    # 8 of max_batch_size 32
    assert moved("convray_batch_fill_ratio_bucket", le="0.1") == 0
    assert moved("convray_batch_fill_ratio_bucket", le="0.25") == 1
    assert moved("convray_batch_fill_ratio_sum") == pytest.approx(0.25)
    assert moved("convray_queue_wait_seconds_count") == 8
    assert moved("convray_batch_call_duration_seconds_count") == 1
    assert moved("convray_model_compute_duration_seconds_count") == 1
    ok = {"api": "oip", "rpc": "ModelInfer", "model": "digits", "code": "OK"}
    assert after.value("convray_requests_total", **ok) == before.value("convray_requests_total", **ok) + 1


def test_while_a_batch_waits_it_shows_as_queued_and_in_flight_and_more_is_refused_for_overload(
    metered, channel, images
):
    port = metered.server.metrics_port
    before = scrape(port)
    replies = {}
    waiting = threading.Thread(
        target=lambda: replies.update(
            batch=oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(oip_batch(images[:8]), timeout=10)
        )
    )
    waiting.start()
    wait_for(lambda: scrape(port).value("convray_queue_depth", **DIGITS) == 8)
    during = scrape(port)
    assert during.value("convray_in_flight_requests", api="oip", model="digits") == 1
    with pytest.raises(grpc.RpcError) as refused:
        classifier_pb2_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=png(images[0])), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    waiting.join(10)
    assert "batch" in replies
    after = scrape(port)
    rejected = {"api": "native", "model": "digits"}
    assert after.value("convray_overload_rejections_total", **rejected) == (
        before.value("convray_overload_rejections_total", **rejected) + 1
    )
    exhausted = {"api": "native", "rpc": "Classify", "model": "digits", "code": "RESOURCE_EXHAUSTED"}
    assert after.value("convray_requests_total", **exhausted) == before.value("convray_requests_total", **exhausted) + 1
    assert after.value("convray_queue_depth", **DIGITS) == 0
    assert after.value("convray_in_flight_requests", api="oip", model="digits") == 0


def test_a_request_whose_deadline_passes_in_the_queue_is_counted_as_expired(metered, channel, images):
    port = metered.server.metrics_port
    expired = {"api": "native", "model": "digits"}
    before = scrape(port).value("convray_deadline_expired_total", **expired)
    with pytest.raises(grpc.RpcError) as info:  # the batch window is 300 ms
        classifier_pb2_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=png(images[0])), timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: scrape(port).value("convray_deadline_expired_total", **expired) == before + 1)


def test_replicas_are_exported_each_with_in_flight_batches_and_gpu_memory_zero_on_cpu(metered, channel, images):
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    for i in range(4):  # least-busy with round-robin ties: both replicas answer
        stub.Classify(pb.ClassifyRequest(image=png(images[i])), timeout=10)
    now = scrape(metered.server.metrics_port)
    assert now.value("convray_replicas", **DIGITS) == 2
    assert now.has("convray_replica_failures_total", **DIGITS)
    for replica in ("digits-0", "digits-1"):
        assert now.has("convray_replica_in_flight_batches", **DIGITS, replica=replica)
        assert now.value("convray_replica_in_flight_batches", **DIGITS, replica=replica) == 0
        assert now.value("convray_replica_fast_path", **DIGITS, replica=replica, transport="direct") == 1
        assert now.has("convray_replica_gpu_memory_allocated_bytes", **DIGITS, replica=replica)
        assert now.value("convray_replica_gpu_memory_allocated_bytes", **DIGITS, replica=replica) == 0
        assert now.value("convray_replica_gpu_memory_reserved_bytes", **DIGITS, replica=replica) == 0
    assert now.value("convray_model_loads_total", **DIGITS, outcome="success") == 1
    assert now.value("convray_model_load_duration_seconds_count", model="digits") == 1
    assert now.value("convray_model_load_duration_seconds_sum", model="digits") > 0
    assert now.value("convray_model_unloads_total", **DIGITS) == 0
    build = [labels for (name, labels) in now.samples if name == "convray_build_info"]
    assert len(build) == 1 and {"version", "torch", "ray", "grpcio", "python"} <= {key for key, _ in build[0]}


def test_the_replicas_gauge_counts_only_replicas_taking_batches_now(metered, channel, images):
    """Before, it was set once at load: a version whose replicas had all died still showed them all."""
    pool = metered.server.registry.resolve("digits", 1).pool

    async def mark_lost(indices: set[int]) -> None:  # as predict does when a batch finds a replica dead
        pool._unwell = indices

    metered.call(mark_lost({0}))
    try:
        assert scrape(metered.server.metrics_port).value("convray_replicas", **DIGITS) == 1
    finally:
        metered.call(mark_lost(set()))
    assert scrape(metered.server.metrics_port).value("convray_replicas", **DIGITS) == 2


def test_a_live_scrape_passes_promtool_check_metrics(metered, channel, images):
    promtool = prometheus_binary("promtool")
    classifier_pb2_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=png(images[0])), timeout=10)
    text = scrape_text(metered.server.metrics_port)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # no lint complaints either


def test_loading_a_new_version_counts_a_load_and_an_unload_and_drops_the_old_replicas_series(
    ray_address, tmp_path, images
):
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    server = ServerThread(server_settings(repo, workers__replicas=1)).start()
    try:
        port = server.server.metrics_port
        with grpc.insecure_channel(server.address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(oip_batch(images[:2]), timeout=10)
            assert scrape(port).has("convray_replica_gpu_memory_allocated_bytes", **DIGITS, replica="digits-0")
            shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
            stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="digits"), timeout=60)
        now = scrape(port)
        v2 = {"model": "digits", "version": "2"}
        assert now.value("convray_model_loads_total", **DIGITS, outcome="success") == 1
        assert now.value("convray_model_loads_total", **v2, outcome="success") == 1
        assert now.value("convray_model_load_duration_seconds_count", model="digits") == 2
        assert now.value("convray_model_unloads_total", **DIGITS) == 1
        assert now.value("convray_model_unloads_total", **v2) == 0
        assert now.value("convray_replicas", **DIGITS) == 0 and now.value("convray_replicas", **v2) == 1
        assert now.value("convray_batch_overlap", **DIGITS) == 0  # nothing in flight for a retired version
        assert now.value("convray_batch_overlap", **v2) == 1  # unmeasured yet: overlap allowed
        assert not now.has("convray_replica_in_flight_batches", **DIGITS, replica="digits-0")
        assert not now.has("convray_replica_fast_path", **DIGITS, replica="digits-0", transport="direct")
        assert not now.has("convray_replica_gpu_memory_allocated_bytes", **DIGITS, replica="digits-0")
        assert now.has("convray_replica_in_flight_batches", **v2, replica="digits-0")
    finally:
        server.stop()


def test_the_batch_overlap_gauge_shows_the_pacing_decision_of_each_served_version(metered, channel, images):
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    for i in range(4):
        stub.Classify(pb.ClassifyRequest(image=png(images[i])), timeout=10)
    served = metered.server.registry.resolve("digits", 0)
    assert served.pacing is not None  # --adaptive-in-flight is on by default
    assert served.pacing.compute_s is not None  # the batches above were measured
    value = scrape(metered.server.metrics_port).value("convray_batch_overlap", **DIGITS)
    assert value == int(served.pacing.overlap_pays)


def test_requests_for_models_not_served_share_one_unknown_label_instead_of_one_series_per_name(metered, channel):
    port = metered.server.metrics_port
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    labels = {"api": "native", "rpc": "Classify", "model": "(unknown)", "code": "NOT_FOUND"}

    def count() -> float:
        now = scrape(port)
        return now.value("convray_requests_total", **labels) if now.has("convray_requests_total", **labels) else 0

    before = count()
    for name in ("no-such-model-1", "no-such-model-2", "no-such-model-3"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(image=b"\x89PNG", model=name), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # A call is recorded just after its status is sent, so the client may scrape first (seen once in CI).
    deadline = time.monotonic() + 10
    while count() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 3
    assert "no-such-model" not in scrape_text(port)


# ---- BufferedHistogram: what a scrape reads equals what prometheus_client's Histogram would have counted ----


def _histogram_samples(histogram_class, values, registry_name="h"):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    histogram = histogram_class(registry_name, "test", ["model"], buckets=(0.001, 0.01, 0.1, 1.0), registry=registry)
    child = histogram.labels("digits")
    for value in values:
        child.observe(value)
    (family,) = registry.collect()
    return {(s.name, s.labels.get("le")): s.value for s in family.samples if not s.name.endswith("created")}


def test_a_buffered_histogram_reads_exactly_as_prometheus_clients_own_on_every_bucket_edge():
    from prometheus_client import Histogram

    from convray.service.metrics import BufferedHistogram

    values = [0.0, 0.0005, 0.001, 0.0010001, 0.01, 0.05, 0.1, 1.0, 7.5, -1.0, 1e9] * 3
    assert _histogram_samples(BufferedHistogram, values) == _histogram_samples(Histogram, values)


def test_a_buffered_histogram_counts_its_queue_by_itself_once_full_so_nobody_scraping_costs_no_memory(monkeypatch):
    from prometheus_client import CollectorRegistry

    from convray.service import metrics

    monkeypatch.setattr(metrics, "FLUSH_AT", 10)
    child = metrics.BufferedHistogram("h", "test", ["model"], registry=CollectorRegistry()).labels("digits")
    for _ in range(35):
        child.observe(0.002)
    assert len(child._queued) < 10  # counted in passes of 10, never read
    assert child._buckets[-1].get() == 0 and sum(bucket.get() for bucket in child._buckets) == 30


def test_observations_from_several_threads_during_scrapes_are_all_counted_once():
    from prometheus_client import CollectorRegistry

    from convray.service.metrics import BufferedHistogram

    registry = CollectorRegistry()
    child = BufferedHistogram("h", "test", ["model"], registry=registry).labels("digits")
    scraping = threading.Event()

    def scrape_until_told() -> None:
        while not scraping.is_set():
            registry.collect()

    def observe(n: int) -> None:
        for _ in range(n):
            child.observe(0.003)

    scraper = threading.Thread(target=scrape_until_told)
    scraper.start()
    observers = [threading.Thread(target=observe, args=(5000,)) for _ in range(4)]
    for thread in observers:
        thread.start()
    for thread in observers:
        thread.join()
    scraping.set()
    scraper.join()
    assert registry.get_sample_value("h_count", {"model": "digits"}) == 20000
    assert registry.get_sample_value("h_sum", {"model": "digits"}) == pytest.approx(60.0)
