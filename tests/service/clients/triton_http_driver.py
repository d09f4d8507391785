"""Drive convray's REST port with NVIDIA's tritonclient.http, exactly as an external OIP REST client would.

Runs in .venv-tritonclient (see triton_driver.py), importing nothing from convray.
Usage: triton_http_driver.py HOST:PORT SCENARIO < payload.json; prints JSON.
"""

import base64
import json
import sys

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

MODEL = "digits"


def health(client, payload):
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "unknown_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(),
        "model": client.get_model_metadata(MODEL),
        "config": client.get_model_config(MODEL),
    }


def infer(client, payload):
    """Pixels with tritonclient's defaults (binary data both ways), as JSON, and compressed (gzip, deflate); encoded
    images (binary only: JSON carries BYTES as UTF-8 text); and the classification extension."""
    pixels = np.asarray(payload["pixels"], dtype=np.float32)
    encoded = np.array([base64.b64decode(e) for e in payload["encoded"]], dtype=np.object_).reshape(-1, 1)
    answers = {}
    requests = []
    for binary in (True, False):
        by_pixels = triton.InferInput("input", list(pixels.shape), "FP32")
        by_pixels.set_data_from_numpy(pixels, binary_data=binary)
        outputs = None if binary else [triton.InferRequestedOutput("probabilities", binary_data=False)]
        requests.append((f"pixels-{binary}", by_pixels, outputs, None))
    requests += [(f"pixels-{algorithm}", requests[0][1], None, algorithm) for algorithm in ("gzip", "deflate")]
    by_image = triton.InferInput("image", list(encoded.shape), "BYTES")
    by_image.set_data_from_numpy(encoded)
    requests.append(("images", by_image, None, None))
    for request_id, tensor, outputs, compression in requests:
        result = client.infer(
            MODEL, [tensor], outputs=outputs, request_id=request_id, request_compression_algorithm=compression
        )
        answers[request_id] = {
            "id": result.get_response()["id"],
            "top": result.as_numpy("probabilities").argmax(axis=1).tolist(),
        }
    ranked = client.infer(MODEL, [by_image], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    answers["classification"] = [s.decode() for s in ranked.as_numpy("probabilities")[0]]
    return answers


def error(client, payload):
    """A request with the wrong shape: tritonclient's status and message."""
    tensor = triton.InferInput("input", [1, 1, 4, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 4, 4), dtype=np.float32))
    try:
        client.infer(MODEL, [tensor])
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return {"status": None}


def repository(client, payload):
    """Statistics, the repository index, a load (of the version served: nothing changes) and a failed unload."""
    answers = {
        "statistics": client.get_inference_statistics(MODEL),
        "all_statistics": client.get_inference_statistics(),
        "index": client.get_model_repository_index(),
    }
    client.load_model(MODEL)
    try:
        client.unload_model("no-such-model")
    except InferenceServerException as exc:
        answers["unload_unknown"] = {"status": exc.status(), "message": exc.message()}
    return answers


SCENARIOS = {"health": health, "infer": infer, "error": error, "repository": repository}

if __name__ == "__main__":
    address, scenario = sys.argv[1], sys.argv[2]
    with triton.InferenceServerClient(address) as client:
        print(json.dumps(SCENARIOS[scenario](client, json.load(sys.stdin))))
