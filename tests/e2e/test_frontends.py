"""`convray serve --frontends N` as a user runs it: N real front-end processes on one port and one embedded Ray."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.v1 import classifier_pb2, classifier_pb2_grpc
from convray.workers.data import load_digits_split
from tests.conftest import digit_png
from tests.deploy.tools import scrape
from tests.e2e.test_cli import CONVRAY, free_port

pytestmark = pytest.mark.e2e


def two_free_ports() -> int:
    """A loopback port that is free now, and the next one too (front ends' metrics ports are consecutive)."""
    while True:
        first = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first


class Group:
    """A `convray serve --frontends 2` process, its log file and its ports."""

    def __init__(self, tmp_path: Path, model_repo: Path, *extra: str) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), two_free_ports(), free_port()
        self.log_path = tmp_path / "serve.log"
        self.process = subprocess.Popen(
            [CONVRAY, "serve", "--frontends", "2", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port), "--model-repo", str(model_repo),
             "--ray-num-cpus", "2", "--cpus-per-replica", "0.5", "--http-port", str(self.http_port), *extra],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"),
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        self.wait_for("convray ready (front end", times=2, timeout_s=150, alive=True)

    def wait_for(self, text: str, times: int = 1, timeout_s: float = 120, alive: bool = False) -> None:
        """Until ``text`` is in the log ``times`` times; with ``alive``, failing at once if the supervisor exits
        (without, front ends may log it after the supervisor is gone)."""
        deadline = time.monotonic() + timeout_s
        while self.log().count(text) < times:
            assert not alive or self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def requests_counted(self, front_end: int) -> float:
        """convray_requests_total summed over labels, from front end ``front_end``'s (from 1) own /metrics."""
        samples = scrape(self.metrics_port + front_end - 1).samples
        return sum(value for (name, _), value in samples.items() if name == "convray_requests_total")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def group(tmp_path, model_repo):
    started = Group(tmp_path, model_repo)
    yield started
    started.close()


def one_connection(port: int) -> grpc.Channel:
    """A channel with a connection of its own (grpc otherwise shares one among a process's channels)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def assert_model_changes_by_rpc_are_refused(port: int) -> None:
    """RepositoryModelLoad/Unload would change one front end only: refused, and nothing is unloaded."""
    with one_connection(port) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name="digits")),
            (stub.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name="digits")),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "runs 2 front-end processes (--frontends)" in raised.value.details()
            assert "--poll-interval-s" in raised.value.details()
        assert stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=30).ready


def test_front_ends_share_the_port_answer_correctly_refuse_model_changes_and_all_stop_on_sigterm(group):
    group.wait_ready()
    _, held_out = load_digits_split()
    for i in range(20):  # 20 connections: the kernel spreads them over both front ends
        with one_connection(group.port) as channel:
            reply = classifier_pb2_grpc.ClassifierStub(channel).Classify(
                classifier_pb2.ClassifyRequest(image=digit_png(held_out.images[i])), timeout=30
            )
            assert reply.predictions[0].index == held_out.labels[i]
    counted = [group.requests_counted(1), group.requests_counted(2)]
    assert sum(counted) == 20 and min(counted) > 0, counted
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8",
                                   "data": held_out.images[0].ravel().tolist()}]}).encode()  # fmt: skip
    for _ in range(20):  # the REST port is shared too: a new connection each (urllib), spread the same way
        url = f"http://127.0.0.1:{group.http_port}/v2/models/digits/infer"
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as reply:
            probabilities = json.loads(reply.read())["outputs"][0]["data"]
        assert probabilities.index(max(probabilities)) == held_out.labels[0]
    by_rest = [group.requests_counted(1) - counted[0], group.requests_counted(2) - counted[1]]
    assert sum(by_rest) == 20 and min(by_rest) > 0, by_rest
    unload = f"http://127.0.0.1:{group.http_port}/v2/repository/models/digits/unload"
    with pytest.raises(urllib.error.HTTPError) as refused:  # as by RPC: it would reach one front end only
        urllib.request.urlopen(urllib.request.Request(unload, b"{}"), timeout=30)
    assert refused.value.code == 400 and "runs 2 front-end processes" in json.loads(refused.value.read())["error"]
    assert f"2 front ends starting on gRPC port 127.0.0.1:{group.port}" in group.log()
    assert_model_changes_by_rpc_are_refused(group.port)  # one group for both: each start costs about 20 s

    group.process.send_signal(signal.SIGTERM)
    assert group.process.wait(60) == 0, group.log()
    log = group.log()
    assert len(re.findall(r"frontend-\d convray.service.server: stopped", log)) == 2, log
    assert "stopped 2 front ends" in log
    assert "SIGTERM received" not in log  # Ray's stack dump for the signal, as if a process had crashed
    for front_end in (1, 2):  # both front ends' ports are closed
        with pytest.raises(OSError):
            group.requests_counted(front_end)


def test_when_one_front_end_dies_the_others_are_stopped_and_the_group_exits_1(group):
    group.wait_ready()
    pid = int(re.search(r"front end 2 of 2 started \(pid (\d+)\)", group.log()).group(1))
    os.kill(pid, signal.SIGKILL)
    assert group.process.wait(60) == 1, group.log()
    log = group.log()
    assert "front end 2 exited with code -9: stopping the others" in log
    assert "frontend-1 convray.service.server: stopped" in log


@pytest.mark.parametrize(
    ("flags", "shortfall", "ray_started"),
    [
        # --ray-num-cpus says what the embedded Ray will have: refused before it starts.
        (("--cpus-per-replica", "1.5"), "x 1.5 CPU (--cpus-per-replica) = 3 CPU, but the Ray cluster has 2", False),
        # Its GPUs are Ray's to detect (none here): refused once it is up.
        (
            ("--gpus-per-replica", "1"),
            "x 1 GPU (--gpus-per-replica, 1 to a GPU) = 2 GPU, but the Ray cluster has 0",
            True,
        ),
    ],
    ids=["cpus", "gpus"],
)
def test_front_ends_whose_replicas_cannot_fit_an_embedded_ray_are_refused_before_any_starts(
    tmp_path, model_repo, flags, shortfall, ray_started, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU case needs a Ray with none, also on a GPU machine
    group = Group(tmp_path, model_repo, *flags)
    try:
        assert group.process.wait(90) == 2, group.log()  # a usage error, as train's equivalent
    finally:
        group.close()
    log = group.log()
    assert (
        f"the replicas cannot all be placed: 2 front ends x 1 model(s) x 1 replica(s) {shortfall} "
        "(--ray-num-cpus, --frontends)"
    ) in log
    assert ("starting a local Ray" in log) == ray_started
    assert "started (pid" not in log


def test_front_ends_whose_supervisor_is_killed_exit_within_seconds(group):
    """SIGKILL leaves the supervisor no chance to pass the stop on, and takes its embedded Ray along."""
    group.wait_ready()
    group.process.kill()
    group.process.wait()
    deadline = time.monotonic() + 30
    while group.log().count("and its embedded Ray with it: exiting") < 2:
        assert time.monotonic() < deadline, group.log()
        time.sleep(0.2)
    for front_end in (1, 2):
        while True:
            try:
                group.requests_counted(front_end)
            except OSError:
                break  # the process, and with it its metrics port, is gone
            assert time.monotonic() < deadline, group.log()
            time.sleep(0.2)


def test_a_ray_cluster_that_does_not_answer_is_named_after_the_connect_timeout(tmp_path, model_repo):
    group = Group(tmp_path, model_repo, "--ray-address", "127.0.0.1:1", "--ray-connect-timeout-s", "3")
    try:
        assert group.process.wait(60) == 1, group.log()
    finally:
        group.close()
    assert "could not connect to 127.0.0.1:1 within 3 s (--ray-address, --ray-connect-timeout-s)" in group.log()
    assert "started (pid" not in group.log()


def test_a_stop_signal_while_ray_starts_stops_the_group_cleanly(group):
    """Ray's own SIGTERM handler exited at once with code 15, or its SystemExit was swallowed inside ray.init and
    the group started as if no signal had come; Ctrl-C gave a traceback out of ray.init."""
    group.wait_for("starting a local Ray for 2 front ends")
    group.process.send_signal(signal.SIGTERM)
    assert group.process.wait(60) == 0, group.log()
    assert "stopped before any front end started" in group.log() and "started (pid" not in group.log()


@pytest.mark.parametrize("after", ["front end 2 of 2 started (pid", "gRPC listening on"])
def test_a_stop_signal_as_the_front_ends_start_is_a_clean_stop(group, after):
    """Before, front ends still starting died of the SIGTERM passed on, and the group exited 1. Now one that has
    not got as far as blocking stop signals ends by it (nothing to drain), and one that has drains once it can."""
    group.wait_for(after)
    group.process.send_signal(signal.SIGTERM)
    assert group.process.wait(60) == 0, group.log()
    assert "stopped 2 front ends" in group.log()
    if after == "gRPC listening on":  # that front end had blocked them: it drained
        assert "convray.service.server: stopped" in group.log()
    with pytest.raises(OSError):  # nothing left serving metrics
        group.requests_counted(1)


def test_front_ends_whose_supervisor_is_killed_while_they_start_exit_all_the_same(group):
    """Before, a front end still importing took the orphaned state for its parent's and never noticed."""
    group.wait_for("front end 2 of 2 started (pid")
    group.process.kill()
    group.process.wait()
    group.wait_for("and its embedded Ray with it: exiting", times=2, timeout_s=30)
