"""The Ray Serve baseline: the same model behind a deployment with @serve.batch, via Serve's gRPC proxy.

One replica, `@serve.batch(max_batch_size, batch_wait_timeout_s)`, `max_ongoing_requests` at least the
batch size (Serve only forms full batches then), our OIP servicer registered on Serve's gRPC proxy so
the same `convray bench` client drives it. Needs `pip install -e '.[bench]'` (ray[serve]).

Run: python tests/bench/ray_serve_server.py --port 50101 --model-repo models --model digits
"""

import argparse
import time

import numpy as np
import ray
from ray import serve
from ray.serve.config import gRPCOptions

from convray.oip import inference_pb2 as oip


def build_app(model_repo: str, model: str, max_batch_size: int, batch_wait_s: float, gpus: float = 0.0):
    """The Serve application: one replica running convray's ModelRunner (same model code as convray)."""

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=max(2 * max_batch_size, 64),
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
    )
    class Classifier:
        def __init__(self) -> None:
            from convray.workers.replica import ModelRunner

            # Warmed like convray's replicas (on a GPU: every batch size up to the maximum), so p99s compare.
            # The device as convray's pool picks it: Ray leaves a GPU visible to an actor that reserved none.
            device = "cuda" if gpus else "cpu"
            self.runner = ModelRunner(
                model_repo, model, version=1, device=device, threads=1, max_batch_size=max_batch_size
            )
            self.shape = self.runner._expected_shape

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
            probabilities, _ = self.runner.predict(np.stack(images))
            return list(probabilities)

        async def ModelMetadata(self, request: oip.ModelMetadataRequest) -> oip.ModelMetadataResponse:  # noqa: N802
            response = oip.ModelMetadataResponse(name=model, versions=["1"], platform="ray_serve")
            response.inputs.add(name="input", datatype="FP32", shape=[-1, *self.shape])
            return response

        async def ModelInfer(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:  # noqa: N802 (RPC name)
            raw = request.raw_input_contents[0]
            if request.inputs[0].datatype == "UINT8":
                pixels = np.frombuffer(raw, np.uint8).reshape(self.shape)
            else:
                pixels = np.rint(np.frombuffer(raw, "<f4")).astype(np.uint8).reshape(self.shape)
            probabilities = await self.predict(pixels)
            response = oip.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
            response.outputs.add(name="probabilities", datatype="FP32", shape=[1, len(probabilities)])
            response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
            return response

    return Classifier.bind()


def main() -> None:
    """Start Ray and Serve with the gRPC proxy, deploy, and wait until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-repo", default="models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=1.0)
    parser.add_argument("--gpus", type=float, default=0.0, help="GPU share of the replica (0: CPU)")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.port + 1},
        grpc_options=gRPCOptions(
            port=args.port,
            grpc_servicer_functions=["convray.oip.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"],
        ),
    )
    app = build_app(args.model_repo, args.model, args.max_batch_size, args.batch_wait_ms / 1000, args.gpus)
    serve.run(app, name="baseline")
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
