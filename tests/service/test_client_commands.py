"""convray classify against a scripted real gRPC server: requests overlap, answers print in the files' order."""

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from convray.service.cli import main
from convray.v1 import classifier_pb2 as pb


def classifier_server(behaviour, method: str = "Classify", workers: int = 4) -> tuple[grpc.Server, int]:
    """A real (unstarted) gRPC server on loopback answering convray.v1.Classifier's ``method`` with ``behaviour``."""
    request, reply = {"Classify": (pb.ClassifyRequest, pb.ClassifyResponse),
                      "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse)}[method]  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    handler = grpc.unary_unary_rpc_method_handler(behaviour, request.FromString, reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("convray.v1.Classifier", {method: handler}),))
    return server, server.add_insecure_port("127.0.0.1:0")


class SlowClassifier:
    """A real gRPC server whose Classify answers the image bytes b"<i>" after (10 - i) * 20 ms, naming i as the
    label, so later files finish first; it notes the most calls it had at once."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        self.server, self.port = classifier_server(self._classify, workers=32)

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


class CappedClassifier:
    """A real gRPC server whose Classify behaves as convray's on a model of ``classes`` classes: top_k 0 means 5
    capped at the class count, and a top_k over the class count is INVALID_ARGUMENT. It notes each top_k asked."""

    def __init__(self, classes: int) -> None:
        self.classes, self.asked = classes, []
        self.server, self.port = classifier_server(self._classify)

    def _classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        self.asked.append(request.top_k)
        if request.top_k > self.classes:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {request.top_k} but the model has fewer classes")
        k = request.top_k or min(5, self.classes)
        return pb.ClassifyResponse(model="m", version=1, predictions=[pb.Prediction(label=str(i)) for i in range(k)])


@pytest.mark.parametrize(("classes", "printed"), [(2, 2), (10, 3)])
def test_classify_without_top_k_asks_for_the_servers_default_and_prints_up_to_3(tmp_path, capsys, classes, printed):
    """Found in review: the default --top-k 3 was sent as such, so every model of fewer classes refused it."""
    fake = CappedClassifier(classes)
    fake.server.start()
    image = tmp_path / "image"
    image.write_bytes(b"x")
    try:
        assert main(["classify", str(image), "--server", f"127.0.0.1:{fake.port}", "--json"]) == 0
        assert main(["classify", str(image), "--server", f"127.0.0.1:{fake.port}", "--json", "--top-k", "1"]) == 0
    finally:
        fake.server.stop(None)
    default, one = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert fake.asked == [0, 1]
    assert len(default["predictions"]) == printed and len(one["predictions"]) == 1


def test_models_says_not_loaded_for_a_model_with_no_version_loaded(capsys):
    """Found in review: it printed "serving v0" for a model unloaded by request."""
    reply = pb.ListModelsResponse(
        models=[pb.ModelSummary(name="digits", versions=[pb.ModelVersionState(version=1)], default_version=0)],
        default_model="digits",
    )
    server, port = classifier_server(lambda request, context: reply, method="ListModels")
    server.start()
    try:
        assert main(["models", "--server", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(None)
    assert capsys.readouterr().out.strip() == "digits: versions 1; not loaded  [default model]"


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
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == args  # a line per file, failures included, in the files' order
    outcomes = [line["predictions"][0]["label"] if "predictions" in line else line["error"]["code"] for line in lines]
    assert outcomes == ["0", "1", "2", "UNREADABLE_FILE", "3", "4", "INVALID_ARGUMENT", "6", "7", "8", "9"]
    assert [line.split(":")[0] for line in err.splitlines()] == [missing, numbered_files[5]]
    assert "INVALID_ARGUMENT: image 5 is not an image" in err
    assert slow_server.most_in_flight == in_flight


def test_classify_refuses_no_requests_in_flight(capsys):
    assert main(["classify", "x.png", "--in-flight", "0"]) == 2
    assert "--in-flight must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["classify", "x.png"], ["models"], ["explain", "x.png", "--out", "maps"]])
@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),  # aborted the process (SIGABRT)
        (["--tls-key", "{cert}"], "--tls-cert and --tls-key go together"),  # was plaintext, silently
        (["--tls-ca", "{missing}"], "--tls-ca {missing}: cannot read: No such file or directory"),  # a traceback
        (["--token-file", "{missing}"], "--token-file {missing}: cannot read"),
        (["--token-file", "{two_lines}"], "must hold one token, with no spaces or line breaks inside"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0"),
        # Found in review: NaN passed the check, and `models --connect-timeout nan` spun a core for good.
        (["--timeout", "nan"], "--timeout must be a number of seconds > 0, got nan"),
        (["--connect-timeout", "nan"], "--connect-timeout must be a number of seconds > 0, got nan"),
        (["--connect-timeout", "inf"], "--connect-timeout must be a number of seconds > 0, got inf"),
    ],
)
def test_client_flags_that_cannot_work_are_usage_errors_before_anything_is_sent(
    tmp_path, capsys, monkeypatch, command, flags, complaint
):
    monkeypatch.chdir(tmp_path)
    files = {"cert": tmp_path / "cert.pem", "missing": tmp_path / "missing", "two_lines": tmp_path / "token"}
    files["cert"].write_text("not checked before the key is")
    files["two_lines"].write_text("a\nb")
    names = {key: str(path) for key, path in files.items()}
    argv = [*command, "--server", "127.0.0.1:1", *(flag.format(**names) for flag in flags)]
    assert main(argv) == 2
    assert complaint.format(**names) in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()  # explain made nothing either


@pytest.mark.parametrize(
    ("server", "tls", "warned"),
    [("10.0.0.1:1", False, True), ("localhost:1", False, False), ("[::1]:1", False, False),
     ("unix:/tmp/convray.sock", False, False), ("10.0.0.1:1", True, False)],
)  # fmt: skip
def test_a_token_sent_in_cleartext_beyond_this_machine_is_warned_about(tmp_path, capsys, server, tls, warned):
    token = tmp_path / "token"
    token.write_text("secret")
    tls_flags = ["--tls-ca", str(token)] if tls else []  # read only when connecting
    main(["models", "--server", server, "--token-file", str(token), *tls_flags, "--connect-timeout", "0.01"])
    assert ("the token goes to 10.0.0.1:1 in cleartext" in capsys.readouterr().err) is warned


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [(["--version", str(2**64)], "--version must be 0 (latest) or a positive version number"),
     (["--top-k", str(2**33)], "--top-k is too large")],
)  # fmt: skip
def test_numbers_protobuf_cannot_hold_are_usage_errors_not_tracebacks(capsys, flags, complaint):
    assert main(["classify", "x.png", "--server", "127.0.0.1:1", *flags]) == 2
    assert complaint in capsys.readouterr().err


def test_explain_refuses_an_out_path_that_is_a_file_before_calling_the_server(tmp_path, capsys):
    image, taken = tmp_path / "digit.png", tmp_path / "taken"
    image.write_bytes(b"x")
    taken.write_text("a file")
    assert main(["explain", str(image), "--server", "127.0.0.1:1", "--out", str(taken)]) == 2
    assert f"--out {taken}: cannot write there" in capsys.readouterr().err


def test_explain_of_an_image_it_cannot_read_makes_no_out_folder(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["explain", str(tmp_path / "missing.png"), "--server", "127.0.0.1:1", "--out", str(out)]) == 1
    assert "missing.png: cannot read" in capsys.readouterr().err and not out.exists()


@contextlib.contextmanager
def fake_classifier(method: str, behaviour, request_type, reply_type) -> Iterator[str]:
    """A real gRPC server whose Classifier has one method, answering as ``behaviour`` says; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(behaviour, request_type.FromString, reply_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("convray.v1.Classifier", {method: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_models_says_unreachable_when_the_server_answers_unavailable(capsys):
    """Exit 3, as classify and explain: a draining server answers UNAVAILABLE, and scripts retry elsewhere."""

    def unavailable(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    with fake_classifier("ListModels", unavailable, pb.ListModelsRequest, pb.ListModelsResponse) as address:
        assert main(["models", "--server", address, "--retries", "0"]) == 3
    assert "UNAVAILABLE: draining" in capsys.readouterr().err


def test_explain_keeps_files_the_server_names_inside_out(tmp_path, capsys):
    """A block name is the server's to choose: "../escaped" wrote outside --out."""

    def explain(request, context):
        return pb.ExplainResponse(model="m", version=1, feature_maps=[pb.FeatureMap(block="../escaped", png=b"png")])

    image, out = tmp_path / "digit.png", tmp_path / "outer" / "maps"
    image.write_bytes(b"x")
    with fake_classifier("Explain", explain, pb.ExplainRequest, pb.ExplainResponse) as address:
        assert main(["explain", str(image), "--server", address, "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == [".._escaped.png"] and not (tmp_path / "outer" / "escaped.png").exists()


def test_explain_removes_an_earlier_runs_class_activation_maps_and_nothing_else(tmp_path, capsys):
    """CAM files are named by rank: an earlier run's cam-2 left beside this run's only map would pass for its own."""

    def explain(request, context):
        prediction = pb.Prediction(label="3", probability=0.9)
        return pb.ExplainResponse(
            model="m", version=1, class_activation_maps=[pb.ClassActivationMap(prediction=prediction, png=b"new")]
        )

    image, out = tmp_path / "digit.png", tmp_path / "maps"
    image.write_bytes(b"x")
    out.mkdir()
    for name in ("cam-1-7.png", "cam-2-1.png", "block0_conv.png", "notes.txt"):
        (out / name).write_bytes(b"old")
    with fake_classifier("Explain", explain, pb.ExplainRequest, pb.ExplainResponse) as address:
        assert main(["explain", str(image), "--server", address, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["block0_conv.png", "cam-1-3.png", "notes.txt"]
    assert (out / "cam-1-3.png").read_bytes() == b"new"


def test_an_explain_call_that_fails_leaves_the_earlier_runs_maps_in_place(tmp_path, capsys):
    def unavailable(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    image, out = tmp_path / "digit.png", tmp_path / "maps"
    image.write_bytes(b"x")
    out.mkdir()
    (out / "cam-1-7.png").write_bytes(b"old")
    with fake_classifier("Explain", unavailable, pb.ExplainRequest, pb.ExplainResponse) as address:
        assert main(["explain", str(image), "--server", address, "--out", str(out)]) == 3
    assert (out / "cam-1-7.png").read_bytes() == b"old"
