"""Classify many images over one ModelStreamInfer stream with NVIDIA's tritonclient.

A stream carries each request as a message on a call already open, instead of a call of its own: on
convray that is 1.8x the throughput of unary calls for a small model (docs/benchmarks.md, "Streams
against unary calls"). convray handles a stream's requests concurrently, so they batch together, and
answers them in the order they were sent.

Run: pip install 'tritonclient[grpc]', then
python examples/tritonclient_stream.py examples/digits/*.png --url localhost:50051
"""

import argparse
import queue
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    """Send every image as encoded bytes on one stream; print each one's most probable class, in order."""
    parser = argparse.ArgumentParser()
    parser.add_argument("images", nargs="+")
    parser.add_argument("--url", default="localhost:50051")
    parser.add_argument("--model", default="digits")
    args = parser.parse_args()

    answers: queue.Queue = queue.Queue()  # the callback runs on tritonclient's stream thread
    client = triton.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for path in args.images:
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([Path(path).read_bytes()], dtype=np.object_))
        client.async_stream_infer(args.model, [image], request_id=path)  # returns at once
    client.stop_stream()  # waits until every request is answered

    failed = 0
    for path in args.images:  # the answers come in the order the requests were sent
        result, error = answers.get_nowait()
        if error is not None:  # a failed item (e.g. an undecodable file) does not end the stream
            print(f"{path}: error: {error}")
            failed += 1
            continue
        probabilities = result.as_numpy("probabilities")[0]
        print(f"{path}: class {int(probabilities.argmax())}, p={probabilities.max():.4f}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
