"""convray classify against a scripted real gRPC server: requests overlap, answers print in the files' order."""

import json
import threading
import time
from concurrent import futures

import grpc
import pytest

from convray.service.cli import main
from convray.v1 import classifier_pb2 as pb


class SlowClassifier:
    """A real gRPC server whose Classify answers the image bytes b"<i>" after (10 - i) * 20 ms, naming i as the
    label, so later files finish first; it notes the most calls it had at once."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        handler = grpc.unary_unary_rpc_method_handler(
            self._classify, pb.ClassifyRequest.FromString, pb.ClassifyResponse.SerializeToString
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("convray.v1.Classifier", {"Classify": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        index = int(request.image)
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep((10 - index) * 0.02)
        with self._lock:
            self.in_flight -= 1
        if index == 5:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image 5 is not an image")
        return pb.ClassifyResponse(model="m", version=1, predictions=[pb.Prediction(label=str(index), probability=1)])


@pytest.fixture
def slow_server():
    server = SlowClassifier()
    server.server.start()
    yield server
    server.server.stop(None)


@pytest.fixture
def numbered_files(tmp_path):
    files = []
    for i in range(10):
        path = tmp_path / f"image-{i}"
        path.write_bytes(str(i).encode())
        files.append(str(path))
    return files


@pytest.mark.parametrize("in_flight", [1, 4])
def test_classify_keeps_in_flight_requests_going_and_prints_in_the_files_order(
    slow_server, numbered_files, in_flight, capsys
):
    missing = numbered_files[0] + "-missing"
    args = [*numbered_files[:3], missing, *numbered_files[3:]]
    server = f"127.0.0.1:{slow_server.port}"
    code = main(["classify", *args, "--server", server, "--json", "--in-flight", str(in_flight)])
    out, err = capsys.readouterr()
    assert code == 1  # the missing file and image 5
    labels = [json.loads(line)["predictions"][0]["label"] for line in out.splitlines()]
    assert labels == ["0", "1", "2", "3", "4", "6", "7", "8", "9"]
    assert [line.split(":")[0] for line in err.splitlines()] == [missing, numbered_files[5]]
    assert "INVALID_ARGUMENT: image 5 is not an image" in err
    assert slow_server.most_in_flight == in_flight


def test_classify_refuses_no_requests_in_flight(capsys):
    assert main(["classify", "x.png", "--in-flight", "0"]) == 2
    assert "--in-flight must be >= 1, got 0" in capsys.readouterr().err
