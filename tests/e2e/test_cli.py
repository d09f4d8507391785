"""The convray CLI as a user runs it: a subprocess against a real server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.workers.data import load_digits_split
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e
CONVRAY = str(Path(sys.executable).parent / "convray")


def run_cli(*args, timeout=120):
    return subprocess.run([CONVRAY, *args], capture_output=True, text=True, timeout=timeout)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now and never handed out before by this process.

    The kernel may offer a port it just released again, so two calls in a row (say, a Ray head's port and
    its metrics port, bound later by the same command) could otherwise get the same one.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """40 held-out digits as PNG files, with their true labels."""
    folder = tmp_path_factory.mktemp("digits")
    _, held_out = load_digits_split()
    files = []
    for i in range(40):
        path = folder / f"held-out-{i}.png"
        Image.fromarray(held_out.images[i, 0], mode="L").save(path)
        files.append((str(path), str(held_out.labels[i])))
    return files


def test_classify_json_prints_one_sorted_line_per_image_and_gets_them_right(served, digit_files):
    result = run_cli("classify", *[p for p, _ in digit_files], "--server", served.address, "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [p for p, _ in digit_files]
    for line in lines:
        assert set(line) == {"image", "model", "version", "predictions"}
        assert line["model"] == "digits" and line["version"] == 1
        probabilities = [p["probability"] for p in line["predictions"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    correct = sum(line["predictions"][0]["label"] == label for line, (_, label) in zip(lines, digit_files, strict=True))
    assert correct / len(lines) >= 0.95


def test_classify_prints_labels_for_the_shipped_examples(served):
    examples = sorted((REPO_ROOT / "examples" / "digits").glob("digit-*.png"))
    result = run_cli("classify", *map(str, examples), "--server", served.address, "--top-k", "1")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n")
    assert len(blocks) == 2 * len(examples)
    for header, best, example in zip(blocks[::2], blocks[1::2], examples, strict=True):
        assert header.startswith(f"{example}: digits v1")
        assert best.split()[0] == example.stem.split("-")[1]


def test_models_lists_what_is_served(served):
    result = run_cli("models", "--server", served.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "digits: versions 1 (loaded); serving v1  [default model]"


def test_classify_reports_bad_files_and_bad_images_with_exit_code_1(served, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    result = run_cli("classify", str(junk), str(tmp_path / "missing.png"), "--server", served.address)
    assert result.returncode == 1
    assert "junk.png: INVALID_ARGUMENT: not a decodable image" in result.stderr
    assert "missing.png: cannot read" in result.stderr


def test_classify_json_gives_every_file_a_line_in_order_failures_included(served, digit_files, tmp_path):
    """Before, a failed file printed only to stderr: a script could not pair stdout's lines with its inputs."""
    junk, missing, good = tmp_path / "junk.png", tmp_path / "missing.png", digit_files[0][0]
    junk.write_bytes(b"definitely not a png")
    result = run_cli("classify", str(junk), str(missing), good, "--server", served.address, "--json")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(junk), str(missing), good]
    assert lines[0]["error"]["code"] == "INVALID_ARGUMENT" and "not a decodable image" in lines[0]["error"]["message"]
    assert lines[1]["error"] == {"code": "UNREADABLE_FILE", "message": "No such file or directory"}
    assert lines[2]["predictions"][0]["label"] == digit_files[0][1]


def test_classify_says_clearly_when_no_server_is_there(tmp_path):
    result = run_cli("classify", "x.png", "--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "1")
    assert result.returncode == 3
    assert "cannot reach a server at 127.0.0.1:" in result.stderr and "convray serve" in result.stderr


def test_train_on_two_ray_train_workers_publishes_a_loadable_version_through_the_cli(tmp_path):
    """`convray train --workers 2`: its own local Ray, two CPU workers, a line per epoch, a loadable version."""
    from convray.workers.repository import ModelRepository

    args = ["--epochs", "2", "--workers", "2", "--model-repo", str(tmp_path), "--model-name", "quick"]
    result = run_cli("train", *args, "--storage-path", str(tmp_path / "runs"), timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "quick" / "1"
    assert f"published {out}  held-out accuracy " in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if "epoch   2/2  loss " in line]
    assert len(epoch_lines) == 1 and " val " in epoch_lines[0] and "img/s" in epoch_lines[0], result.stdout
    loaded = ModelRepository(tmp_path).load("quick", 1)
    assert loaded.metadata.training["config"]["workers"] == 2 and loaded.metadata.metrics["accuracy"] > 0.5
    assert {p.name for p in out.iterdir()} >= {"model.json", "model.safetensors", "training_curve.png"}


def test_train_with_a_bad_dataset_is_a_usage_error():
    result = run_cli("train", "--workers", "0", "--dataset", "mnist")
    assert result.returncode == 2 and "use 'digits', 'folder:PATH' or 'npz:PATH'" in result.stderr


def wait_serving(port: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING in time")


def test_serve_joins_a_ray_cluster_serves_and_exits_0_on_sigterm(ray_address, model_repo, digit_files):
    port = free_port()
    env = {**os.environ, "CONVRAY_WORKERS__CPUS_PER_REPLICA": "0.25"}
    process = subprocess.Popen(
        [CONVRAY, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
         "--model-repo", str(model_repo), "--ray-address", ray_address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_serving(port, process)
        result = run_cli("classify", digit_files[0][0], "--server", f"127.0.0.1:{port}", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["predictions"][0]["label"] == digit_files[0][1]
        # Found in review: any client could unload every model. Off unless --model-control, as in Triton.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                    oip.RepositoryModelUnloadRequest(model_name="digits"), timeout=30
                )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "start the server with --model-control" in refused.value.details()
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log
    assert "SIGTERM received" not in log, log  # Ray's stack dump for the signal, as if something had crashed
    assert "SIGTERM handler is not set" not in log, log  # Ray's notice, which read as if a stop would not work
    ready_lines = [line for line in log.splitlines() if "convray ready:" in line]
    assert len(ready_lines) == 1 and f"127.0.0.1:{port}" in ready_lines[0]
    assert ready_lines[0].endswith("event loop uvloop")  # --event-loop auto, uvloop being installed with convray
    assert "shutting down" in log and "stopped" in log


def test_serve_exits_1_with_a_clear_message_when_no_model_can_load(ray_address, tmp_path):
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    result = run_cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--no-metrics",
                     "--model-repo", str(empty), "--ray-address", ray_address)  # fmt: skip
    assert result.returncode == 1
    assert f"model repository {empty} holds no model versions" in result.stderr


def test_serve_exits_1_naming_the_address_when_ray_cannot_be_reached():
    result = run_cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--no-metrics",
                     "--ray-address", "127.0.0.1:1", "--ray-connect-timeout-s", "3", timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "could not connect to 127.0.0.1:1 within 3 s (--ray-address, --ray-connect-timeout-s)" in result.stderr


def test_serve_with_an_embedded_ray_stays_up_and_serves(model_repo, digit_files, tmp_path):
    """The quickstart path (`make serve`): no --ray-address, so convray starts its own local Ray.

    Regression: Ray kills its GCS and raylet when the thread that started them ends, so the thread
    that runs ray.init must outlive it. The front end never loads torch (only its replicas use it): it
    took about 180 MiB and 2 s of every front-end process.
    """
    port = free_port()
    process = subprocess.Popen(
        [CONVRAY, "serve", "--host", "127.0.0.1", "--port", str(port), "--no-metrics", "--model-repo",
         str(model_repo), "--ray-num-cpus", "1", "--cpus-per-replica", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_serving(port, process)
        time.sleep(3)  # longer than it takes a GCS killed at start-up to be noticed by a first call
        for path, label in digit_files[:3]:
            result = run_cli("classify", path, "--server", f"127.0.0.1:{port}", "--json", "--timeout", "20")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["predictions"][0]["label"] == label
        result = run_cli("explain", digit_files[0][0], "--out", str(tmp_path), "--server", f"127.0.0.1:{port}")
        assert result.returncode == 0, result.stderr  # an Explanation came back and was read without torch
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log
    assert "SIGTERM received" not in log, log  # Ray's stack dump for the signal, as if something had crashed
    assert "Token authentication is enabled" not in log, log  # Ray's notice at each start of an embedded Ray
