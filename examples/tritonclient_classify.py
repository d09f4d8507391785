"""Classify an image with NVIDIA's tritonclient against convray's Open Inference Protocol endpoint.

Run: pip install 'tritonclient[grpc,http]' pillow, then
python examples/tritonclient_classify.py examples/digits/digit-3.png --url localhost:50051
python examples/tritonclient_classify.py examples/digits/digit-3.png --url localhost:8000 --protocol http
(the second needs the server's REST port: convray serve --http-port 8000)
"""

import argparse
import importlib

import numpy as np
from PIL import Image


def main() -> None:
    """Send the image twice: as encoded bytes, and as an FP32 NCHW tensor of pixel values 0..255."""
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--url", default="localhost:50051")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    args = parser.parse_args()
    triton = importlib.import_module(f"tritonclient.{args.protocol}")  # the same calls over either

    client = triton.InferenceServerClient(args.url)
    print("server ready:", client.is_server_ready(), "| model ready:", client.is_model_ready(args.model))
    metadata = client.get_model_metadata(args.model)  # a protobuf message over gRPC, a dict over HTTP
    if args.protocol == "grpc":
        metadata = {"inputs": [{"name": i.name, "shape": list(i.shape)} for i in metadata.inputs]}
    _, channels, height, width = (int(d) for d in next(i for i in metadata["inputs"] if i["name"] == "input")["shape"])

    # 1. The encoded file as a BYTES tensor: the server decodes, resizes and normalises.
    encoded = triton.InferInput("image", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([open(args.image, "rb").read()], dtype=np.object_))
    top3 = triton.InferRequestedOutput("probabilities", class_count=3)  # the classification extension
    result = client.infer(args.model, [encoded], outputs=[top3], request_id="bytes-1")
    print("BYTES input, top 3 (value:index:label):", [s.decode() for s in result.as_numpy("probabilities")[0]])

    # 2. Plain pixels as FP32 NCHW; only the shape from the metadata is needed.
    mode = "L" if channels == 1 else "RGB"
    image = Image.open(args.image).convert(mode).resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32).reshape(1, channels, height, width)
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    probabilities = client.infer(args.model, [tensor]).as_numpy("probabilities")[0]
    print("FP32 input, most probable class:", int(probabilities.argmax()), f"p={probabilities.max():.4f}")


if __name__ == "__main__":
    main()
