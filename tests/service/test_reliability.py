"""The server on its worst day: overload, expired deadlines, a replica killed under load, SIGTERM mid-flight.

Figures these tests print (with -s) are recorded in docs/reliability.md.
"""

import collections
import concurrent.futures
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.service.cli import main as cli_main
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc
from convray.workers.data import load_digits_split
from tests.conftest import SHIPPED_MODELS, ServerThread, server_settings
from tests.e2e.test_cli import free_port, wait_serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pngs():
    _, held_out = load_digits_split()
    encoded = []
    for pixels in held_out.images[:32]:
        buffer = io.BytesIO()
        Image.fromarray(pixels[0], mode="L").save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded, held_out.labels[:32]


def start(tmp_path_factory, **overrides) -> ServerThread:
    repo = tmp_path_factory.mktemp("reliability") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    return ServerThread(server_settings(repo, **overrides)).start()


def scrape(server: ServerThread, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5) as reply:
        lines = [line for line in reply.read().decode().splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.fixture(scope="module")
def slow_batches(ray_address, tmp_path_factory):
    """One replica; batches of up to 8 always wait up to 1 s to fill; at most 4 requests may queue."""
    server = start(
        tmp_path_factory,
        workers__replicas=1,
        batching__max_batch_size=8,
        batching__max_batch_delay_ms=1000.0,
        batching__max_queue=4,
        batching__batches_in_flight_per_replica=1,
        batching__dispatch_when_idle=False,
        server__http_port=0,
    )
    yield server
    server.stop()


def pixels_request(images: int) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[np.zeros(images * 64, "<f4").tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[images, 1, 8, 8])
    return request


def test_a_request_past_the_queue_bound_fails_fast_with_resource_exhausted_and_when_to_retry(slow_batches):
    with grpc.insecure_channel(slow_batches.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        waiting = stub.ModelInfer.future(pixels_request(3), timeout=10)  # 3 of the 4 places, for up to 1 s
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pixels_request(2), timeout=10)
        assert time.monotonic() - started < 0.5  # refused at once, not after the 1 s batch wait
        assert waiting.result().outputs
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full (3 of 4 places taken, 2 more requested; --max-queue); retry in about" in info.value.details()
    # The same advice for programs: the time the queue's oldest request had waited, as google.rpc.RetryInfo.
    retry_info = error_details_pb2.RetryInfo()
    (detail,) = rpc_status.from_call(info.value).details
    assert detail.Unpack(retry_info)
    assert 0.25 <= retry_info.retry_delay.ToNanoseconds() / 1e9 < 1.0  # the client slept 0.3 s after sending


def test_over_rest_a_request_past_the_queue_bound_is_answered_429_with_when_to_retry(slow_batches):
    def rest_infer(images: int):
        body = json.dumps({"inputs": [{"name": "input", "shape": [images, 1, 8, 8], "datatype": "FP32",
                                       "data": [0.0] * (images * 64)}]}).encode()  # fmt: skip
        url = f"http://127.0.0.1:{slow_batches.server.http_port}/v2/models/digits/infer"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as failed:
            return failed.code, failed.headers, failed.read()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(rest_infer, 3)  # 3 of the 4 places, for up to 1 s
        time.sleep(0.3)
        status, headers, body = rest_infer(2)
        assert waiting.result()[0] == 200
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 2  # whole seconds, rounded up
    assert "queue full (3 of 4 places taken, 2 more requested; --max-queue)" in json.loads(body)["error"]


def test_a_burst_of_thousands_of_calls_is_answered_resource_exhausted_past_the_queue_never_cancelled(slow_batches):
    """Found in review: grpc core cancelled calls still waiting for the server to take them up (past 1,000), and
    their clients saw CANCELLED, which they take for their own doing and do not retry."""
    with grpc.insecure_channel(slow_batches.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(pixels_request(1), timeout=60) for _ in range(3000)]
        codes = collections.Counter(call.code() for call in calls)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_a_request_larger_than_the_whole_queue_is_invalid(slow_batches):
    with grpc.insecure_channel(slow_batches.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pixels_request(6), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no retry can help it
    assert "6 items in one request, more than its whole queue holds (4, --max-queue)" in info.value.details()


def test_grpc_retries_wait_as_long_as_the_refusal_says(slow_batches, pngs):
    images, _ = pngs
    # A client retry policy of its own would retry after 10 ms and meet the same full queue; the server's
    # pushback (the queue's current delay) makes the one retry come once the queue has drained.
    retry_policy = {
        "methodConfig": [{
            "name": [{"service": "convray.v1.Classifier"}],
            "retryPolicy": {
                "maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s", "backoffMultiplier": 1,
                "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
            },
        }]
    }  # fmt: skip
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(retry_policy))]
    with grpc.insecure_channel(slow_batches.address, options=options) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        full = [stub.Classify.future(pb.ClassifyRequest(image=images[i]), timeout=30) for i in range(4)]
        time.sleep(0.6)  # the queue is full, its oldest request 0.6 s old; its batch forms at 1 s
        started = time.monotonic()
        reply = stub.Classify(pb.ClassifyRequest(image=images[4]), timeout=30)
        assert reply.predictions and all(f.result().predictions for f in full)
        assert time.monotonic() - started >= 0.5  # the retry waited the pushback, not the 10 ms backoff


def test_under_a_flood_every_request_is_answered_ok_or_resource_exhausted(slow_batches, pngs):
    images, labels = pngs
    with grpc.insecure_channel(slow_batches.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        calls = [stub.Classify.future(pb.ClassifyRequest(image=images[i % 32]), timeout=30) for i in range(40)]
        codes, latencies = [], []
        for call in calls:
            try:
                reply = call.result()
                codes.append(grpc.StatusCode.OK)
                latencies.append(reply.timings.total_ms)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0 and codes.count(grpc.StatusCode.OK) > 0
    # Admitted requests waited at most about one batch delay plus one batch ahead of them, never unboundedly.
    assert max(latencies) < 5000
    print(f"\nflood of 40 against --max-queue 4: {codes.count(grpc.StatusCode.OK)} OK, "
          f"{codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)} RESOURCE_EXHAUSTED, "
          f"admitted p100 {max(latencies):.0f} ms")  # fmt: skip
    assert slow_batches.call(queue_depth(slow_batches)) == 0


async def queue_depth(server: ServerThread) -> int:
    """Requests waiting in the server's batchers (read on the server's own event loop)."""
    return sum(s.batcher.queue_depth for s in server.server.registry.served_versions())


@pytest.mark.parametrize("retries,exit_code", [(3, 0), (0, 1)])
def test_convray_classify_retries_a_refused_call_after_the_advised_delay(
    slow_batches, pngs, tmp_path, capsys, retries, exit_code
):
    images, _ = pngs
    image = tmp_path / "digit.png"
    image.write_bytes(images[5])
    with grpc.insecure_channel(slow_batches.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        full = [stub.Classify.future(pb.ClassifyRequest(image=images[i]), timeout=30) for i in range(4)]
        time.sleep(0.6)  # the queue is full, its oldest request 0.6 s old
        argv = ["classify", str(image), "--json", "--server", slow_batches.address, "--retries", str(retries)]
        assert cli_main(argv) == exit_code
        assert all(f.result().predictions for f in full)
    out, err = capsys.readouterr()
    if exit_code == 0:
        assert len(json.loads(out)["predictions"]) == 3  # the default --top-k
    else:
        assert "RESOURCE_EXHAUSTED" in err and "retry in about" in err


def test_a_deadline_that_passes_in_the_queue_drops_the_request_unrun_and_counts_it(slow_batches, pngs):
    images, _ = pngs
    executions_before = slow_batches.server.registry.served_versions()[0].stats.execution_count
    expired_before = scrape(slow_batches, 'convray_deadline_expired_total{api="native"')
    with grpc.insecure_channel(slow_batches.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(image=images[0]), timeout=0.3)  # the batch waits 1 s to fill
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.2)  # past the moment its batch would have formed
        assert slow_batches.call(queue_depth(slow_batches)) == 0  # its queue place was freed
        assert slow_batches.server.registry.served_versions()[0].stats.execution_count == executions_before
        assert scrape(slow_batches, 'convray_deadline_expired_total{api="native"') == expired_before + 1
        assert stub.Classify(pb.ClassifyRequest(image=images[0]), timeout=10).predictions  # still serving


def test_a_replica_killed_under_load_is_replaced_and_no_request_is_lost(ray_address, tmp_path_factory, pngs):
    images, labels = pngs
    server = start(tmp_path_factory, workers__replicas=2, batching__max_batch_delay_ms=1.0)
    sent, answers, stop = [0], [], threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            i = worker
            while not stop.is_set():
                with lock:
                    sent[0] += 1
                try:
                    reply = stub.Classify(pb.ClassifyRequest(image=images[i % 32]), timeout=30)
                    outcome = (
                        time.monotonic(),
                        "OK",
                        reply.timings.replica,
                        reply.predictions[0].label == str(labels[i % 32]),
                    )
                except grpc.RpcError as exc:
                    outcome = (time.monotonic(), exc.code().name, "", False)
                with lock:
                    answers.append(outcome)
                i += 4

    try:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim = server.server.registry.served_versions()[0].pool.actors[0]
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=False)  # as if the process died: Ray restarts it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the restarted replica answers again
            if any(t > killed_at and r.endswith("-0") and code == "OK" for t, code, r, _ in list(answers)):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        failures = scrape(server, "convray_replica_failures_total")
    finally:
        server.stop()
    codes = [code for _, code, _, _ in answers]
    assert len(answers) == sent[0]  # every request sent got an answer
    assert set(codes) <= {"OK", "UNAVAILABLE"}
    back = min(t for t, code, r, _ in answers if t > killed_at and r.endswith("-0") and code == "OK")
    after_kill = [a for a in answers if a[0] > killed_at]
    assert sum(a[3] for a in answers) / len(answers) >= 0.95
    print(f"\nreplica kill under load: {len(answers)} requests, {codes.count('OK')} OK, "
          f"{codes.count('UNAVAILABLE')} UNAVAILABLE, replica failures seen {failures:.0f}, "
          f"{len(after_kill)} answered after the kill, killed replica serving again after "
          f"{back - killed_at:.1f} s")  # fmt: skip


def test_sigterm_finishes_in_flight_requests_then_exits_0(ray_address, model_repo, pngs):
    """A stream left open by its client ends at once, with UNAVAILABLE, rather than holding the drain's 10 s grace
    and then being cancelled (found in review)."""
    images, labels = pngs
    more = threading.Event()

    def one_image_then_silence():
        yield pb.ClassifyRequest(image=images[0], request_id="streamed")
        more.wait(60)  # the client keeps its stream open, sending nothing

    port = free_port()
    env = {**os.environ, "CONVRAY_WORKERS__CPUS_PER_REPLICA": "0.25"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "convray"), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--no-metrics", "--model-repo", str(model_repo), "--ray-address", ray_address,
         "--max-batch-size", "64", "--max-batch-delay-ms", "1500", "--dispatch-when-idle", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_serving(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            stream = stub.ClassifyStream(one_image_then_silence(), timeout=60)
            assert next(stream).request_id == "streamed"  # answered; nothing else on the way
            in_flight = [stub.Classify.future(pb.ClassifyRequest(image=images[i]), timeout=30) for i in range(12)]
            time.sleep(0.5)  # all 12 are admitted and waiting for their batch to fill
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(pb.ClassifyRequest(image=images[0]), timeout=5)
            replies = [call.result() for call in in_flight]
            with pytest.raises(grpc.RpcError) as stream_ended:
                next(stream)
        _, log = process.communicate(timeout=60)
        exited_after_s = time.monotonic() - signalled
    finally:
        more.set()
        if process.poll() is None:
            process.kill()
    assert stream_ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the requests on this stream that got no reply were not processed" in stream_ended.value.details()
    assert exited_after_s < 8, "the open stream held the drain for its grace period"
    assert [r.predictions[0].label for r in replies] == [str(label) for label in labels[:12]]
    assert all(r.timings.batch_size == 12 for r in replies)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert process.returncode == 0, log
    assert "shutting down" in log


def test_concurrent_calls_from_many_threads_all_resolve(served, pngs):
    images, _ = pngs
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda i: stub.Classify(pb.ClassifyRequest(image=images[i % 32]), timeout=30),
                                    range(200)))  # fmt: skip
    assert len(replies) == 200 and all(r.predictions for r in replies)
