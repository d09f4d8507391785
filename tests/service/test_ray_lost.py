"""Ray lost after start, against the real thing: a Ray head of the test's own, a server joined to it, the
head killed (every process of it, as when its pod dies) and started again on the same port.

The suite's shared Ray is left alone: this test's head runs in a temporary directory of its own, and only
processes naming that directory are killed. Figures it prints (with -s) are in docs/reliability.md.
"""

import concurrent.futures
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc
from convray.workers.data import load_digits_split
from tests.conftest import digit_png
from tests.e2e.test_cli import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RayHead:
    """``ray start --head`` in a directory of its own, killable without touching any other Ray."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        # A token of its own, so the test needs no ~/.ray/auth_token and shares nothing with other clusters.
        token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, attempts: int = 1) -> float:
        """Start the head; the seconds it took. Fails with Ray's own output.

        With ``attempts`` > 1 a failed start is tried again on fresh ports: a port found free can be taken by
        another process before Ray binds it. A restart keeps its port (the server must find Ray where it was).
        """
        for attempt in range(attempts):
            if attempt:
                self.port = free_port()
            started = time.monotonic()
            result = subprocess.run(
                [str(BIN / "ray"), "start", "--head", "--port", str(self.port), "--num-cpus", "1",
                 "--temp-dir", self.dir, "--include-dashboard", "false", "--disable-usage-stats",
                 "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())],
                capture_output=True, text=True, env=self.env, timeout=120,
            )  # fmt: skip
            if result.returncode == 0:
                return time.monotonic() - started
            self.kill()
        output = (result.stdout + result.stderr)[-3000:]
        raise AssertionError(f"ray start failed with exit code {result.returncode}: {output}")

    def processes(self) -> list[psutil.Process]:
        """Ray's processes of this head, and their children (workers retitle themselves, e.g. ray::ModelRunner)."""
        found = set()
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.dir in part for part in process.info["cmdline"] or ()):
                    found |= {process, *process.children(recursive=True)}
            except psutil.Error:
                pass
        return list(found)

    def kill(self) -> int:
        processes = self.processes()
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(processes, timeout=10)
        return len(processes)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def health(channel: grpc.Channel, service: str = "") -> int | None:
    """The health status of ``service``, or None while the server does not answer (still starting)."""
    try:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
    except grpc.RpcError:
        return None


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen) -> float:
    """Poll ``condition`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert process.poll() is None, f"server exited {process.returncode} while waiting for {what}"
        assert time.monotonic() - started < timeout_s, f"no {what} within {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - started


def ray_connected(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        lines = [line for line in reply.read().decode().splitlines() if line.startswith("convray_ray_connected ")]
    return float(lines[0].split()[1])


def classify_codes(metrics_port: int) -> dict[str, float]:
    """convray_requests_total for native Classify, by status code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    prefix = 'convray_requests_total{api="native",code="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in lines
        if line.startswith(prefix) and 'rpc="Classify"' in line
    }


def rest(port: int, path: str, body: dict | None = None, timeout_s: float = 10) -> tuple[int, bytes]:
    """(status, body) of one call to the server's REST port."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as failed:
        return failed.code, failed.read()


def test_ray_lost_after_start_is_reported_fails_calls_fast_and_is_rejoined_when_ray_returns(model_repo):
    _, held_out = load_digits_split()
    png = digit_png(held_out.images[0])
    head = RayHead()
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    server = None
    try:
        first_start_s = head.start(attempts=2)
        server = subprocess.Popen(
            [str(BIN / "convray"), "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
             "--metrics-port", str(metrics_port), "--model-repo", str(model_repo),
             "--ray-address", f"127.0.0.1:{head.port}", "--replicas", "1", "--cpus-per-replica", "0.5",
             "--ray-check-interval-s", "1", "--ray-lost-exit-s", "150", "--http-port", str(http_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=head.env,
        )  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
            wait_for(lambda: health(channel) == SERVING, 120, "SERVING", server)
            assert stub.Classify(pb.ClassifyRequest(image=png), timeout=10).predictions
            assert ray_connected(metrics_port) == 1

            lost_at = time.monotonic()
            killed = head.kill()
            # Sent just after the kill: its batch waits on a replica that is gone, until the server notices.
            in_flight = stub.Classify.future(pb.ClassifyRequest(image=png), timeout=30)
            zeros = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
            in_flight_rest = concurrent.futures.ThreadPoolExecutor(1).submit(rest, http_port, "/v2/models/digits/infer",
                                                                             zeros, 30)  # fmt: skip
            detected_s = wait_for(lambda: health(channel) == NOT_SERVING, 15, "NOT_SERVING", server)
            with pytest.raises(grpc.RpcError) as failed:
                in_flight.result()
            in_flight_s = time.monotonic() - lost_at
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            assert in_flight_s < 15  # answered when the loss was noticed, not at its 30 s deadline
            status, body = in_flight_rest.result(timeout=30)  # over REST alike: 503 when noticed
            assert status == 503 and "Ray cluster this server uses is unreachable" in json.loads(body)["error"]
            assert time.monotonic() - lost_at < 15
            codes = classify_codes(metrics_port)  # counted as answered: UNAVAILABLE, not CANCELLED
            assert codes.get("UNAVAILABLE") == 1 and "CANCELLED" not in codes, codes
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(pb.ClassifyRequest(image=png), timeout=10)
            refused_s = time.monotonic() - started
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Ray cluster this server uses is unreachable" in refused.value.details()
            assert "retry on another server" in refused.value.details()
            assert refused_s < 1.0
            assert classify_codes(metrics_port).get("UNAVAILABLE") == 2  # refused at the gate, counted all the same
            for service in ("convray.v1.Classifier", "inference.GRPCInferenceService"):
                assert health(channel, service) == NOT_SERVING
            assert health(channel, "liveness") == SERVING  # the process is fine: no restart needed yet
            assert not oip_stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
            assert not oip_stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=5).ready
            assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models  # metadata still answers
            assert ray_connected(metrics_port) == 0
            # The same over REST: inference refused 503 saying why, not ready, metadata answered.
            status, body = rest(http_port, "/v2/models/digits/infer", {"inputs": []})
            assert status == 503 and "Ray cluster this server uses is unreachable" in json.loads(body)["error"]
            assert rest(http_port, "/v2/health/ready")[0] == 400 and rest(http_port, "/v2/models/digits")[0] == 200

            restart_s = head.start()  # a new cluster on the same port
            back_s = wait_for(lambda: health(channel) == SERVING, 120, "SERVING again", server)
            reply = stub.Classify(pb.ClassifyRequest(image=png), timeout=30)
            assert reply.predictions[0].label == str(held_out.labels[0])
            assert oip_stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
            assert rest(http_port, "/v2/health/ready")[0] == 200
            assert ray_connected(metrics_port) == 1
        server.terminate()
        _, log = server.communicate(timeout=60)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        head.remove()
    assert "Ray cluster at" in log and "lost" in log and "Ray cluster back after" in log, log
    assert server.returncode == 0, log
    print(f"\nRay lost: {killed} head processes killed; NOT_SERVING after {detected_s:.1f} s; the in-flight "
          f"call got UNAVAILABLE after {in_flight_s:.1f} s; new calls refused in {refused_s * 1e3:.0f} ms; "
          f"ray start took {first_start_s:.1f} s, then {restart_s:.1f} s; SERVING again {back_s:.1f} s after "
          "the restart")  # fmt: skip


def test_a_server_without_the_clusters_token_is_refused_and_exits_1_naming_token_authentication():
    """Ray retries a refused token until the timeout, saying why only in its own log: the message names the cause.
    (A wrong token reads the same; checked by hand, 2026-11-27.)"""
    head = RayHead()
    try:
        head.start(attempts=2)
        env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
        result = subprocess.run(
            [str(BIN / "convray"), "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--no-metrics",
             "--ray-address", f"127.0.0.1:{head.port}", "--ray-connect-timeout-s", "4"],
            capture_output=True, text=True, env=env, timeout=90,
        )  # fmt: skip
    finally:
        head.remove()
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"could not connect to 127.0.0.1:{head.port} within 4 s" in result.stderr
    assert "a cluster with Ray token authentication also refuses a process without its token" in result.stderr
    assert "InvalidAuthToken" in result.stderr  # Ray's own reason, in its log: what the hint points at
