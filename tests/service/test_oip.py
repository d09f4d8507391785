"""The Open Inference Protocol endpoint, driven by NVIDIA's tritonclient from its own virtual env."""

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from convray.oip import inference_pb2 as oip
from convray.oip import inference_pb2_grpc as oip_grpc
from convray.service.oip_codec import serialize_bytes
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from tests.conftest import REPO_ROOT, SHIPPED_MODELS, ServerThread, server_settings

pytestmark = pytest.mark.integration
CLIENT_PYTHON = REPO_ROOT / ".venv-tritonclient" / "bin" / "python"
DRIVER = REPO_ROOT / "tests" / "service" / "clients" / "triton_driver.py"

if not CLIENT_PYTHON.exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"{CLIENT_PYTHON} is missing: `make test` creates it")
    pytest.skip("no .venv-tritonclient: run `make test` (it creates it)", allow_module_level=True)


def triton(address: str, scenario: str, **payload):
    """Run one tritonclient scenario against ``address`` and return its JSON result."""
    result = subprocess.run(
        [str(CLIENT_PYTHON), str(DRIVER), address, scenario],
        input=json.dumps(payload), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def held_out():
    _, data = load_digits_split()
    return data


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels[0], mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_health_and_readiness(served):
    assert triton(served.address, "health") == {
        "live": True, "ready": True, "model_ready": True, "model_ready_v1": True,
        "model_ready_v9": False, "unknown_ready": False,
    }  # fmt: skip


def test_server_and_model_metadata_and_config(served):
    reply = triton(served.address, "metadata")
    assert reply["server"]["name"] == "convray"
    assert "classification" in reply["server"]["extensions"]
    model = reply["model"]
    assert model["name"] == "digits" and model["versions"] == ["1"]
    assert model["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    assert model["inputs"][1] == {"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}  # as config's [1]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = reply["config"]
    assert config["maxBatchSize"] == 32
    assert config["input"][0]["format"] == "FORMAT_NCHW" and config["input"][0]["dims"] == ["1", "8", "8"]
    assert config["input"][1]["dims"] == ["1"]
    assert config["input"][0]["optional"] and config["input"][1]["optional"]  # a request sends one of the two
    assert config["output"][0]["name"] == "probabilities"
    assert config["instanceGroup"][0]["count"] == 2
    assert "dynamicBatching" in config


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_infer_with_pixel_tensors_classifies_held_out_digits(served, held_out, datatype):
    images = held_out.images[:32].astype(float).tolist()
    reply = triton(served.address, "infer", images=images, datatype=datatype, id="req-7")
    assert reply["id"] == "req-7" and reply["model_version"] == "1"
    assert reply["datatype"] == "FP32" and reply["shape"] == [32, 10]
    probabilities = np.array(reply["probabilities"])
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == held_out.labels[:32]).mean() >= 0.95


def test_infer_with_encoded_images_as_bytes(served, held_out):
    encoded = [png_b64(p) for p in held_out.images[:16]]
    reply = triton(served.address, "infer", encoded=encoded)
    probabilities = np.array(reply["probabilities"])
    assert probabilities.shape == (16, 10)
    assert (probabilities.argmax(axis=1) == held_out.labels[:16]).mean() >= 0.9


def test_pixels_and_bytes_give_the_same_probabilities(served, held_out):
    as_pixels = triton(served.address, "infer", images=held_out.images[:4].astype(float).tolist())
    as_png = triton(served.address, "infer", encoded=[png_b64(p) for p in held_out.images[:4]])
    assert np.allclose(as_pixels["probabilities"], as_png["probabilities"], atol=1e-6)


def test_classification_extension_returns_top_k_value_index_label(served, held_out):
    reply = triton(served.address, "infer", images=held_out.images[:3].astype(float).tolist(), classification=3)
    assert reply["datatype"] == "BYTES" and reply["shape"] == [3, 3]
    plain = np.array(
        triton(served.address, "infer", images=held_out.images[:3].astype(float).tolist())["probabilities"]
    )
    for row, strings in zip(plain, reply["probabilities"], strict=True):
        parts = [s.split(":") for s in strings]
        assert [int(p[1]) for p in parts] == list(np.argsort(-row)[:3])
        assert all(p[2] == p[1] for p in parts)  # digits' labels are their indices
        assert [float(p[0]) for p in parts] == pytest.approx(sorted(row)[::-1][:3], abs=1e-6)


def test_async_infer_answers_every_request(served, held_out):
    reply = triton(served.address, "async_infer", images=held_out.images[:12].astype(float).tolist())
    assert np.array(reply["answers"]).argmax(axis=1).tolist() == held_out.labels[:12].tolist()


def test_stream_answers_in_order_with_errors_inline(served, held_out):
    reply = triton(served.address, "stream", images=held_out.images[:10].astype(float).tolist())["replies"]
    assert [r["id"] for r in reply[:10]] == [f"s{i}" for i in range(10)]
    assert [r["top"] for r in reply[:10]] == held_out.labels[:10].tolist()
    assert "INVALID_ARGUMENT" in reply[10]["error"] and "must have shape [N, 1, 8, 8]" in reply[10]["error"]
    assert "request 'bad': " in reply[10]["error"]  # tritonclient gives its stream callback no id with an error


@pytest.mark.parametrize(
    "min_client_ping_interval_s,kept", [(0.1, True), (300.0, False)], ids=["pings-allowed", "grpc-default-policy"]
)
def test_a_tritonclient_with_keepalive_on_keeps_its_stream_when_its_pings_are_allowed(
    ray_address, tmp_path, held_out, min_client_ping_interval_s, kept
):
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    settings = server_settings(repo, server__min_client_ping_interval_s=min_client_ping_interval_s, workers__replicas=1)
    server = ServerThread(settings).start()
    try:
        images = held_out.images[:2].astype(float).tolist()
        reply = triton(server.address, "stream_with_a_pause", images=images, pause_s=5, keepalive_ms=200)["replies"]
    finally:
        server.stop()
    if kept:
        assert [r.get("id") for r in reply] == ["before", "after"]
        assert [r["top"] for r in reply] == held_out.labels[:2].tolist()
    else:  # what grpc's own policy does to such a client: the stream ends with the pings it sent
        assert any("Too many pings" in r.get("error", "") for r in reply), reply


@pytest.mark.parametrize(
    "kind,status,message",
    [
        ("wrong_datatype", "StatusCode.INVALID_ARGUMENT", "must be FP32 or UINT8, got datatype 'INT32'"),
        ("wrong_shape", "StatusCode.INVALID_ARGUMENT", r"must have shape [N, 1, 8, 8], got [1, 1, 28, 28]"),
        ("unknown_model", "StatusCode.NOT_FOUND", "model 'nope' is not served"),
        ("unknown_version", "StatusCode.NOT_FOUND", "version 9 of model 'digits' is not loaded"),
        ("unsupported_parameter", "StatusCode.INVALID_ARGUMENT", "unsupported parameter(s) ['fancy'] on the request"),
        ("too_big_batch", "StatusCode.INVALID_ARGUMENT", "batch size (first dimension of the shape) must be 1..32"),
        ("bad_image", "StatusCode.INVALID_ARGUMENT", "not a decodable image"),
        ("shared_memory", "StatusCode.UNIMPLEMENTED", ""),
    ],
)
def test_errors_reach_tritonclient_with_a_clear_status(served, kind, status, message):
    reply = triton(served.address, "error", kind=kind, n=33)
    assert reply["status"] == status
    assert message in reply["message"]


def test_malformed_bytes_length_prefix_is_invalid_argument(channel):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[b"\xff\x00\x00\x00abc"])
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element 0 claims 255 bytes but only 3 remain" in info.value.details()


def test_model_ready_says_no_for_what_is_not_loaded_and_refuses_a_version_that_is_not_a_number(channel):
    """As Triton: a version it cannot parse is INVALID_ARGUMENT, not a plain 'not ready' that hides the mistake."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=5).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="digits", version="9"), timeout=5).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nope"), timeout=5).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelReady(oip.ModelReadyRequest(name="digits", version="latest"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model version must be empty (latest) or a positive integer, got 'latest'" in info.value.details()


def test_a_bytes_tensor_with_more_elements_than_its_shape_is_refused_at_the_first_extra_one(channel):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[bytes(4 * 1_000_000)])  # 1M empty ones
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BYTES tensor holds more than the 1 element(s) its shape says" in info.value.details()


@pytest.mark.parametrize("field", ["model_name", "input_name", "datatype", "output_name"])
def test_a_name_too_long_to_repeat_gets_its_own_status_with_a_short_message(channel, field):
    """Repeated whole, a 20,000-character name made the status too big for gRPC's metadata: RESOURCE_EXHAUSTED."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    long = "x" * 20_000
    request = oip.ModelInferRequest(model_name=long if field == "model_name" else "digits")
    request.inputs.add(name=long if field == "input_name" else "input", shape=[1, 1, 8, 8],
                       datatype=long if field == "datatype" else "FP32")  # fmt: skip
    request.raw_input_contents.append(bytes(4 * 64))
    if field == "output_name":
        request.outputs.add(name=long)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    expected = grpc.StatusCode.NOT_FOUND if field == "model_name" else grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.code() == expected, info.value.details()[:200]
    assert "'xxxxxxxx" in info.value.details() and "... (20000 characters)" in info.value.details()
    assert len(info.value.details()) < 500


def test_an_id_too_long_to_echo_is_refused_alone_and_a_stream_goes_on(channel, held_out):
    """Review: replies echo the id; one of 64 MiB made a reply too large to send (native streams lost their rest)."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    def request(request_id: str) -> oip.ModelInferRequest:
        infer = oip.ModelInferRequest(model_name="digits", id=request_id,
                                      raw_input_contents=[held_out.images[:1].tobytes()])  # fmt: skip
        infer.inputs.add(name="input", datatype="UINT8", shape=[1, 1, 8, 8])
        return infer

    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request("r" * 1025), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "the request's id is 1025 characters, over the limit of 1024"
    replies = list(stub.ModelStreamInfer(iter([request("a"), request("r" * (8 << 20)), request("c")]), timeout=60))
    assert [r.infer_response.id for r in replies] == ["a", "", "c"]
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert "[INVALID_ARGUMENT]" in replies[1].error_message and len(replies[1].error_message) < 1500


def test_one_stream_of_full_batches_waits_for_room_instead_of_overflowing_the_queue(channel):
    """300 requests of 32 images sent at once: 9,600 images, against a queue of 512. Before, 252 of the 300 were
    answered RESOURCE_EXHAUSTED, as if the server were overloaded by others, not this stream itself."""
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[bytes(32 * 64)])
    request.inputs.add(name="input", datatype="UINT8", shape=[32, 1, 8, 8])
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    replies = list(stub.ModelStreamInfer(iter([request] * 300), timeout=120))
    assert len(replies) == 300
    assert [r.error_message for r in replies if r.error_message] == []
    assert all(r.infer_response.outputs[0].shape == [32, 10] for r in replies)


def test_tritons_timeout_parameter_limits_how_long_a_request_may_wait(channel, held_out):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[held_out.images[:1].tobytes()])
    request.inputs.add(name="input", datatype="UINT8", shape=[1, 1, 8, 8])
    request.parameters["timeout"].int64_param = 10_000_000  # 10 s: plenty
    assert stub.ModelInfer(request, timeout=30).outputs[0].shape == [1, 10]
    request.parameters["timeout"].int64_param = 1  # 1 us: past before the batch can go
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_bad_image_among_several_is_named_by_its_place_in_the_request(channel):
    """Found in review: one bad image in a batch of 32 was reported without saying which."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    request = oip.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(serialize_bytes([buffer.getvalue(), buffer.getvalue(), b"junk"]))
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("image 3 of 3: not a decodable image")


def test_mlserver_content_types_on_the_request_and_input_are_accepted(channel, held_out):
    """MLServer's NumpyRequestCodec and NumpyCodec mark the request and the input "np"."""
    request = oip.ModelInferRequest(
        model_name="digits", raw_input_contents=[held_out.images[:2].astype("<f4").tobytes()]
    )
    request.parameters["content_type"].string_param = "np"
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 8, 8])
    tensor.parameters["content_type"].string_param = "np"
    reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    probabilities = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 10)
    assert probabilities.argmax(axis=1).tolist() == held_out.labels[:2].tolist()


def test_a_request_of_images_too_large_together_is_refused_before_any_is_decoded(channel):
    """Each blank 6000x6000 PNG is within --max-image-pixels (40 M) and 140 KB; 32 of them took 11 s to decode."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")
    blank = buffer.getvalue()
    request = oip.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[12])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(blank)) + blank for _ in range(12)))
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 images are 432000000 pixels in all, over the limit of 400000000 (--max-request-pixels)" in (
        info.value.details()
    )


def test_statistics_count_real_inferences(served, held_out):
    before = triton(served.address, "statistics")["modelStats"][0]
    triton(served.address, "infer", images=held_out.images[:5].astype(float).tolist())
    after = triton(served.address, "statistics")["modelStats"][0]
    assert int(after["inferenceCount"]) == int(before.get("inferenceCount", 0)) + 5
    assert int(after["executionCount"]) > int(before.get("executionCount", 0))
    success = after["inferenceStats"]["success"]
    assert int(success["count"]) > int(before["inferenceStats"].get("success", {}).get("count", 0))
    assert int(success["ns"]) > 0 and int(after["inferenceStats"]["computeInfer"]["ns"]) > 0
    assert after["batchStats"] and all(int(b["batchSize"]) >= 1 for b in after["batchStats"])


class Aborted(Exception):
    """What ``AbortingContext.abort`` raises, as gRPC's own context does, with the status it was given."""


class AbortingContext:
    """The little of a grpc.aio ServicerContext a handler that fails uses."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str, trailers: tuple = ()) -> None:
        raise Aborted(code, message)


async def test_model_control_is_refused_as_unavailable_until_the_start_up_loads_are_done(model_repo):
    """Before, a load sent as the port opened failed INTERNAL (Ray not started yet), or ran next to the start-up
    load of the same version and left a second, orphaned set of replicas."""
    from prometheus_client import CollectorRegistry

    from convray.service.config import BatchingSettings, WorkerSettings
    from convray.service.metrics import Metrics
    from convray.service.oip_servicer import InferenceServicer
    from convray.service.registry import ModelRegistry
    from convray.workers.repository import ModelRepository

    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(ModelRepository(model_repo), "digits", BatchingSettings(), WorkerSettings(), metrics)
    servicer = InferenceServicer(None, registry, metrics, BatchingSettings(), WorkerSettings())
    for call in (
        servicer.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="digits"), AbortingContext()),
        servicer.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="digits"), AbortingContext()),
    ):
        with pytest.raises(Aborted) as refused:
            await call
        assert refused.value.args == (grpc.StatusCode.UNAVAILABLE, "server is starting: models are still loading; "
                                                                   "retry shortly")  # fmt: skip


async def test_the_repository_index_lists_a_version_still_served_after_its_directory_was_removed(model_repo):
    """Found in review: it listed only what was on disk, and the version actually serving was missing."""
    from prometheus_client import CollectorRegistry

    from convray.service.config import BatchingSettings, WorkerSettings
    from convray.service.metrics import Metrics
    from convray.service.oip_servicer import InferenceServicer
    from convray.service.registry import ModelRegistry, ServedModel
    from convray.workers.repository import ModelRepository

    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(ModelRepository(model_repo), "digits", BatchingSettings(), WorkerSettings(), metrics)
    registry._served["digits"] = {2: ServedModel("digits", 2, None, None, None, None)}  # digits/2 is not on disk
    servicer = InferenceServicer(None, registry, metrics, BatchingSettings(), WorkerSettings())
    reply = await servicer.RepositoryIndex(oip.RepositoryIndexRequest(), AbortingContext())
    assert [(m.name, m.version, m.state) for m in reply.models] == [
        ("digits", "1", "UNAVAILABLE"),
        ("digits", "2", "READY"),
    ]


# ---- a server of its own: batching across APIs, load and unload ----


@pytest.fixture(scope="module")
def own_server(ray_address, tmp_path_factory):
    """A one-replica server that always waits up to 300 ms to fill batches of 16, on its own repository copy."""
    repo = tmp_path_factory.mktemp("oip") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    settings = server_settings(repo, batching__max_batch_size=16, batching__max_batch_delay_ms=300.0,
                             batching__dispatch_when_idle=False, workers__replicas=1)  # fmt: skip
    server = ServerThread(settings).start()
    yield server, repo
    server.stop()


def test_an_oip_batch_and_native_singles_share_one_dynamic_batch(own_server, held_out):
    server, _ = own_server
    images = held_out.images[:16]
    with grpc.insecure_channel(server.address) as channel:
        oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)
        native = classifier_pb2_grpc.ClassifierStub(channel)
        stats_before = oip_stub.ModelStatistics(oip.ModelStatisticsRequest(name="digits"), timeout=10)
        request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[images[:8].astype("<f4").tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=[8, 1, 8, 8])
        barrier = threading.Barrier(9)
        replies = {}

        def send_oip():
            barrier.wait()
            replies["oip"] = oip_stub.ModelInfer(request, timeout=30)

        def send_native(i):
            buffer = io.BytesIO()
            Image.fromarray(images[i, 0], mode="L").save(buffer, format="PNG")
            barrier.wait()
            replies[i] = native.Classify(pb.ClassifyRequest(image=buffer.getvalue()), timeout=30)

        threads = [threading.Thread(target=send_oip)] + [
            threading.Thread(target=send_native, args=(i,)) for i in range(8, 16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats_after = oip_stub.ModelStatistics(oip.ModelStatisticsRequest(name="digits"), timeout=10)
    assert [replies[i].timings.batch_size for i in range(8, 16)] == [16] * 8
    executions = stats_after.model_stats[0].execution_count - stats_before.model_stats[0].execution_count
    assert executions == 1
    probabilities = np.frombuffer(replies["oip"].raw_output_contents[0], dtype="<f4").reshape(8, 10)
    assert (probabilities.argmax(axis=1) == held_out.labels[:8]).mean() >= 0.85


def test_unload_and_load_through_tritonclient(own_server, held_out):
    server, _ = own_server
    reply = triton(server.address, "load_unload", images=held_out.images[:1].astype(float).tolist())
    assert reply["after_unload"] is False
    assert reply["infer_after_unload"]["status"] == "StatusCode.NOT_FOUND"
    assert reply["index_unloaded"]["models"] == [
        {"name": "digits", "version": "1", "state": "UNAVAILABLE", "reason": "not loaded"}
    ]
    assert reply["after_load"] is True
    assert reply["index_loaded"]["models"] == [{"name": "digits", "version": "1", "state": "READY"}]


def test_load_moves_to_a_new_version_and_a_broken_one_leaves_it_serving(own_server):
    server, repo = own_server
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
        stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="digits"), timeout=60)
        assert stub.ModelReady(oip.ModelReadyRequest(name="digits", version="2"), timeout=5).ready
        assert not stub.ModelReady(oip.ModelReadyRequest(name="digits", version="1"), timeout=5).ready

        broken = repo / "digits" / "3"
        shutil.copytree(repo / "digits" / "2", broken)
        (broken / "model.safetensors").write_bytes(b"corrupt")
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="digits"), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model.safetensors: not a readable safetensors file" in info.value.details()
        assert stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=5).ready
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="digits"), timeout=5)
        assert list(metadata.versions) == ["2"]


def test_a_version_left_with_no_replica_able_to_serve_is_not_ready_and_refused_saying_why(own_server, held_out):
    """Its replicas died for good and no replacement started (tests/workers/test_pool.py makes that happen for
    real); before, ModelReady stayed true and every request went to a dead replica first."""
    server, _ = own_server
    served = server.server.registry.resolve("digits", 0)
    reason = "digits version 1 has no running replica: Ray will not restart them and new ones did not start"

    def given_up(replicas: dict[int, str]) -> None:
        async def assign() -> None:
            served.pool._given_up = replicas

        server.call(assign())

    pixels = held_out.images[:1].astype("<f4").tobytes()
    request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[pixels])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        given_up({0: "FileNotFoundError: digits/1/model.safetensors"})
        try:
            assert not stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=5).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason.replace("version 1", f"version {served.version}") in info.value.details()
            assert "FileNotFoundError" in info.value.details()
        finally:
            given_up({})
        assert stub.ModelReady(oip.ModelReadyRequest(name="digits"), timeout=5).ready
        assert stub.ModelInfer(request, timeout=10).outputs[0].name == "probabilities"


@pytest.mark.parametrize("name", ["../models/digits", "/etc", "digits/../digits", "x" * 20_000])
def test_loading_or_unloading_a_path_instead_of_a_model_name_is_refused(own_server, name):
    """Before, a path was loaded from wherever it led, outside the repository, under that name."""
    server, _ = own_server
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name=name)),
            (stub.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name=name)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid model name" in info.value.details() and len(info.value.details()) < 500
        assert {m.name for m in stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=5).models} == {"digits"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_readme_tritonclient_example_runs(served, protocol):
    """Over gRPC and, against the REST port, over HTTP (tritonclient.http), as the README shows both."""
    example = REPO_ROOT / "examples" / "tritonclient_classify.py"
    image = REPO_ROOT / "examples" / "digits" / "digit-3.png"
    address = served.address if protocol == "grpc" else f"127.0.0.1:{served.server.http_port}"
    result = subprocess.run(
        [str(CLIENT_PYTHON), str(example), str(image), "--url", address, "--protocol", protocol],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "server ready: True | model ready: True"
    assert lines[1].startswith("BYTES input, top 3 (value:index:label): ['") and ":3:3'" in lines[1]
    assert lines[2].startswith("FP32 input, most probable class: 3 ")


def test_the_tritonclient_stream_example_answers_every_image_in_order_like_unary_calls(served, tmp_path):
    images = sorted((REPO_ROOT / "examples" / "digits").glob("digit-*.png"))
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"plain text")
    sent = [*images[:5], not_an_image, *images[5:]]
    result = subprocess.run(
        [str(CLIENT_PYTHON), str(REPO_ROOT / "examples" / "tritonclient_stream.py"), *map(str, sent),
         "--url", served.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # one item failed
    lines = result.stdout.splitlines()
    assert len(lines) == len(sent)
    assert lines[5].startswith(f"{not_an_image}: error: [INVALID_ARGUMENT] request '{not_an_image}': not a decodable")
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.address))
    for path, line in zip(images, lines[:5] + lines[6:], strict=True):
        request = oip.ModelInferRequest(model_name="digits", raw_input_contents=[serialize_bytes([path.read_bytes()])])
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        reply = stub.ModelInfer(request, timeout=10)
        unary = np.frombuffer(reply.raw_output_contents[0], "<f4")
        assert line == f"{path}: class {int(unary.argmax())}, p={unary.max():.4f}"
