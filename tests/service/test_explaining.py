"""The Explain RPC against the real server on a real local Ray: maps, shapes, PNG sizes, probabilities, errors."""

import asyncio
import io

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from convray.service.config import ExplainSettings
from convray.service.errors import Overloaded
from convray.service.explaining import Explainer, evenly_spread
from convray.service.render import grid_layout, tile_scale
from convray.v1 import classifier_pb2 as pb
from convray.workers.spec import CNNSpec, output_shapes
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration
DIGIT_3 = (REPO_ROOT / "examples" / "digits" / "digit-3.png").read_bytes()


@pytest.fixture(scope="module")
def spec(stub):
    return CNNSpec.model_validate_json(stub.GetModel(pb.GetModelRequest(), timeout=30).spec_json)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_explain_returns_every_blocks_maps_with_the_specs_names_and_shapes(stub, spec):
    reply = stub.Explain(pb.ExplainRequest(image=DIGIT_3), timeout=30)
    expected = output_shapes(spec, 8, 8)
    assert [m.block for m in reply.feature_maps] == [name for name, _ in expected]
    assert [tuple(m.shape) for m in reply.feature_maps] == [shape for _, shape in expected]
    for m in reply.feature_maps:
        channels, height, width = m.shape
        image = png(m.png)
        rows, columns = grid_layout(channels)
        tile = tile_scale(height, width)
        assert (m.grid_rows, m.grid_columns, m.channels_shown) == (rows, columns, channels)
        assert image.mode == "L"
        assert image.size == (columns * width * tile + columns - 1, rows * height * tile + rows - 1)


def test_explain_gives_classifys_probabilities_and_a_cam_per_top_class(stub):
    reply = stub.Explain(pb.ExplainRequest(image=DIGIT_3, top_k=3), timeout=30)
    classified = stub.Classify(pb.ClassifyRequest(image=DIGIT_3, top_k=3), timeout=30)
    assert (reply.model, reply.version) == ("digits", 1)
    assert [(p.label, p.index) for p in reply.predictions] == [(p.label, p.index) for p in classified.predictions]
    assert np.allclose([p.probability for p in reply.predictions], [p.probability for p in classified.predictions])
    assert reply.predictions[0].label == "3"
    assert reply.method == pb.CAM_METHOD_CAM  # the shipped model has a gap_fc head with no hidden layers
    assert reply.cam_block == "block5_dropout"
    assert [c.prediction.label for c in reply.class_activation_maps] == [p.label for p in reply.predictions]
    for cam in reply.class_activation_maps:
        image = png(cam.png)
        assert image.mode == "RGB" and image.size == (128, 128)
    assert reply.compute_ms > 0 and reply.total_ms >= reply.compute_ms and reply.replica.startswith("digits-")


def test_explain_takes_named_blocks_grad_cam_and_caps_channels(stub):
    request = pb.ExplainRequest(image=DIGIT_3, blocks=["block3_conv", "block0_conv"], method=pb.CAM_METHOD_GRAD_CAM)
    reply = stub.Explain(request, timeout=30)
    assert [m.block for m in reply.feature_maps] == ["block0_conv", "block3_conv"]
    block3 = reply.feature_maps[1]
    assert list(block3.shape) == [64, 4, 4] and block3.channels_shown == 64  # the server's cap is 64
    assert reply.method == pb.CAM_METHOD_GRAD_CAM and len(reply.class_activation_maps) == 5  # default top_k


@pytest.mark.parametrize(
    "request_fields,message",
    [
        (
            {"blocks": ["block9_conv"]},
            "unknown block(s) ['block9_conv'] for model 'digits'; valid blocks: ['block0_conv', 'block1_conv', "
            "'block2_pool', 'block3_conv', 'block4_pool', 'block5_dropout']",
        ),
        # Found in review: each of millions of names was listed, holding the event loop for a second; then that they
        # were all copied and compared (sixteenth session)
        ({"blocks": [f"x{i}" for i in range(1000)]}, ", ...] (1000 in all) for model 'digits'; valid blocks:"),
        ({"blocks": [f"x{i}" for i in range(100_000)]}, "100000 blocks named, over the 1024 read; name at most 16"),
        ({"top_k": 11}, "top_k is 11 but model 'digits' has 10 classes"),
        ({"method": 7}, "unknown method 7"),
        ({"image": b"not an image"}, "not a decodable image"),
    ],
)
def test_bad_explain_requests_are_invalid_argument_naming_the_problem(stub, request_fields, message):
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(pb.ExplainRequest(**{"image": DIGIT_3, **request_fields}), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_explain_for_an_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(pb.ExplainRequest(image=DIGIT_3, model="nope"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def tight_stub(ray_address, tmp_path_factory):
    """A second server with small Explain limits."""
    import shutil

    from convray.v1 import classifier_pb2_grpc
    from tests.conftest import SHIPPED_MODELS, ServerThread, server_settings

    repo = tmp_path_factory.mktemp("tight") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    settings = server_settings(
        repo, workers__replicas=1, explain__max_blocks=2, explain__max_channels=8, explain__max_top_k=2
    )
    server = ServerThread(settings).start()
    with grpc.insecure_channel(server.address) as channel:
        yield classifier_pb2_grpc.ClassifierStub(channel)
    server.stop()


def test_explain_limits_blocks_classes_and_channels(tight_stub):
    for request, message in [
        (
            pb.ExplainRequest(image=DIGIT_3, blocks=["block0_conv", "block1_conv", "block3_conv"]),
            "3 blocks asked for, over the limit of 2 (--explain-max-blocks); name at most 2 of ['block0_conv',",
        ),
        (
            pb.ExplainRequest(image=DIGIT_3, blocks=["block0_conv"], top_k=3),
            "top_k is 3, over the Explain limit of 2 (--explain-max-top-k)",
        ),
        (  # refused before the names are copied or compared: a request may name millions (found in review)
            pb.ExplainRequest(image=DIGIT_3, blocks=["block0_conv"] * 1025),
            "1025 blocks named, over the 1024 read; name at most 2 (--explain-max-blocks)",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            tight_stub.Explain(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    reply = tight_stub.Explain(pb.ExplainRequest(image=DIGIT_3, blocks=["block0_conv", "block3_conv"]), timeout=30)
    assert [m.channels_shown for m in reply.feature_maps] == [8, 8]
    assert [list(m.shape) for m in reply.feature_maps] == [[32, 8, 8], [64, 4, 4]]
    assert png(reply.feature_maps[0].png).size == (3 * 32 + 2, 3 * 32 + 2)  # 8 tiles: 3 x 3 grid of 32 px
    assert len(reply.class_activation_maps) == 2  # default top_k (5) capped at the limit


def test_explain_of_a_model_with_more_blocks_than_the_limit_spreads_the_limit_over_them_first_to_last(tight_stub):
    """Before, naming no block asked for all six and was refused: a deep model's plain `convray explain` failed."""
    reply = tight_stub.Explain(pb.ExplainRequest(image=DIGIT_3), timeout=30)
    assert [m.block for m in reply.feature_maps] == ["block0_conv", "block5_dropout"]


def test_blocks_spread_evenly_keep_the_first_and_the_last_and_all_when_they_fit():
    names = [f"b{i}" for i in range(53)]
    assert evenly_spread(names, 4) == ["b0", "b17", "b35", "b52"]
    assert evenly_spread(names, 1) == ["b52"]  # the last block: the one class activation maps use
    assert evenly_spread(names[:3], 16) == ["b0", "b1", "b2"]


def test_explain_calls_past_the_in_flight_limit_are_refused_as_overload(stub):
    """Explain runs outside the batcher and its queue: unbounded, 64 calls at once slowed Classify 350-fold and
    none was ever refused (found in review). Past --explain-max-in-flight (4 here), RESOURCE_EXHAUSTED."""
    request = pb.ExplainRequest(image=DIGIT_3, top_k=3, method=pb.CAM_METHOD_GRAD_CAM)
    calls = [stub.Explain.future(request, timeout=60) for _ in range(40)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "the limit (--explain-max-in-flight); retry in about" in exc.details()
                retry_info = error_details_pb2.RetryInfo()  # when to retry, for programs, as for Classify
                (detail,) = rpc_status.from_call(exc).details
                assert detail.Unpack(retry_info) and 0 < retry_info.retry_delay.ToNanoseconds() < 60e9
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert stub.Explain(request, timeout=60).model == "digits"  # the places come back


async def test_an_explain_refused_for_overload_says_when_the_oldest_call_should_free_its_place(monkeypatch):
    """The delay is the last call's duration less the time the oldest call in flight has run."""
    explainer = Explainer(None, None, ExplainSettings(max_in_flight=1), default_top_k=3, executor=None)
    durations = iter([0.4, None, 0.0])  # the first call takes 0.4 s, the second until released
    release = asyncio.Event()

    async def explain(*_args):
        duration = next(durations)
        await (asyncio.sleep(duration) if duration else release.wait())

    monkeypatch.setattr(explainer, "_explain", explain)
    await explainer.explain(b"", "m", 0, [], 0, "auto")
    holding = asyncio.create_task(explainer.explain(b"", "m", 0, [], 0, "auto"))
    await asyncio.sleep(0.2)
    with pytest.raises(Overloaded) as refused:
        await explainer.explain(b"", "m", 0, [], 0, "auto")
    assert 0.1 <= refused.value.retry_after_s <= 0.3  # about 0.4 s less the 0.2 s the holding call has run
    release.set()
    await holding
    await explainer.explain(b"", "m", 0, [], 0, "auto")  # its place came back
    assert explainer._last_duration_s < 0.1  # that one took no time

    async def refused(*_args):
        await asyncio.sleep(0.3)
        raise ValueError("a call that fails")

    monkeypatch.setattr(explainer, "_explain", refused)
    with pytest.raises(ValueError):
        await explainer.explain(b"", "m", 0, [], 0, "auto")
    assert explainer._last_duration_s < 0.1  # a failed call's time is no explanation's
