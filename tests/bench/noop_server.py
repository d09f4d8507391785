"""The floor for any Python gRPC server: a grpc.aio server answering ModelInfer with a fixed reply.

ModelStreamInfer answers each item of a stream with the same reply, the floor for `convray bench --streaming`.

Run: python tests/bench/noop_server.py --port 50100 --shape 1,8,8
"""

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np

from convray.oip import inference_pb2 as oip


def fixed_reply() -> bytes:
    """A serialised ModelInferResponse shaped like convray's answer for one 10-class image."""
    response = oip.ModelInferResponse(model_name="digits", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(np.full(10, 0.1, "<f4").tobytes())
    return response.SerializeToString()


def metadata_reply(shape: list[int]) -> bytes:
    """ModelMetadata with the input shape the client should send (the bench client asks for it)."""
    response = oip.ModelMetadataResponse(name="noop", versions=["1"], platform="noop")
    response.inputs.add(name="input", datatype="FP32", shape=[-1, *shape])
    response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
    return response.SerializeToString()


async def main(port: int, shape: list[int]) -> None:
    """Serve until killed."""
    reply, metadata = fixed_reply(), metadata_reply(shape)
    stream_reply = oip.ModelStreamInferResponse(infer_response=oip.ModelInferResponse.FromString(reply))
    stream_reply_bytes = stream_reply.SerializeToString()

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    async def model_stream_infer(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield stream_reply_bytes

    async def model_metadata(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return metadata

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(model_metadata),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shape", default="1,8,8", help="C,H,W of the input the metadata announces")
    args = parser.parse_args()
    asyncio.run(main(args.port, [int(d) for d in args.shape.split(",")]))
