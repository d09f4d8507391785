"""The real server with replicas that hold a GPU: they run on CUDA and answer as the CPU replicas do.

Skipped where torch sees no GPU (CI); docs/benchmarks.md says where these ran.
"""

import shutil

import grpc
import numpy as np
import pytest
import ray
import torch

from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from tests.conftest import SHIPPED_MODELS, ServerThread, server_settings
from tests.service.test_server import encode_digit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]


def classify_all(server: ServerThread, images: list[bytes]) -> np.ndarray:
    """Every image's probabilities for all ten classes, in label order."""
    with grpc.insecure_channel(server.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        rows = []
        for image in images:
            reply = stub.Classify(pb.ClassifyRequest(image=image, top_k=10), timeout=60)
            by_label = {p.label: p.probability for p in reply.predictions}
            rows.append([by_label[str(k)] for k in range(10)])
    return np.array(rows)


def replica_placement(server: ServerThread) -> list[dict]:
    async def describe() -> list[dict]:
        served = server.server.registry.served_versions()
        return [await actor.describe.remote() for model in served for actor in model.pool._actors]

    return server.call(describe())


@pytest.fixture(scope="module")
def digits(ray_address, tmp_path_factory):
    """A copy of the shipped repository, 40 held-out digits as PNGs, and the CPU server's answers to them."""
    repo = tmp_path_factory.mktemp("gpu") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    _, held_out = load_digits_split()
    images = [encode_digit(pixels, "PNG") for pixels in held_out.images[:40]]
    server = ServerThread(server_settings(repo, workers__replicas=1, workers__device="cpu")).start()
    try:
        return repo, images, classify_all(server, images)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "graph,amp,cuda_graphs,tolerance",
    [
        ("frozen", "none", False, 1e-3),
        ("eager", "bf16", False, 3e-2),
        ("compiled", "fp16", False, 1e-2),
        ("frozen", "none", True, 1e-3),
        ("eager", "bf16", True, 3e-2),
    ],
)
def test_gpu_replicas_run_on_cuda_and_agree_with_the_cpu_server(
    ray_address, digits, graph, amp, cuda_graphs, tolerance
):
    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray does not see the GPU that torch sees"
    repo, images, on_cpu = digits
    settings = server_settings(
        repo, workers__replicas=1, workers__device="cuda", workers__gpus_per_replica=0.5,
        workers__graph=graph, workers__amp=amp, workers__cuda_graphs=cuda_graphs,
    )  # fmt: skip
    server = ServerThread(settings).start()
    try:
        placement = replica_placement(server)
        assert [info["device"] for info in placement] == ["cuda"] and placement[0]["graph"] == graph
        assert placement[0]["cuda_graphs"] == cuda_graphs
        assert placement[0]["warmed_up_to"] == settings.batching.max_batch_size  # no request is the first of its size
        on_gpu = classify_all(server, images)
    finally:
        server.stop()
    np.testing.assert_allclose(on_gpu, on_cpu, atol=tolerance)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).all()
