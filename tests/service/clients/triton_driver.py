"""Drive convray with NVIDIA's tritonclient, exactly as an external OIP client would.

Runs in its own virtual environment (.venv-tritonclient: tritonclient pins protobuf < 7), so it
imports nothing from convray. Usage: triton_driver.py HOST:PORT SCENARIO < payload.json; prints JSON.
"""

import base64
import json
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as triton
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

MODEL = "digits"


def failure(exc: InferenceServerException) -> dict:
    return {"status": exc.status(), "message": exc.message()}


def pixels_input(images, datatype="FP32"):
    array = np.asarray(images, dtype=np.float32 if datatype == "FP32" else np.uint8)
    tensor = triton.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def bytes_input(encoded_b64):
    array = np.array([base64.b64decode(e) for e in encoded_b64], dtype=np.object_)
    tensor = triton.InferInput("image", [len(array)], "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def health(client, payload):
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "model_ready_v1": client.is_model_ready(MODEL, "1"),
        "model_ready_v9": client.is_model_ready(MODEL, "9"),
        "unknown_ready": client.is_model_ready("nope"),
    }


def metadata(client, payload):
    return {
        "server": MessageToDict(client.get_server_metadata()),
        "model": MessageToDict(client.get_model_metadata(MODEL)),
        "config": MessageToDict(client.get_model_config(MODEL).config),
    }


def infer(client, payload):
    if "encoded" in payload:
        tensor = bytes_input(payload["encoded"])
    else:
        tensor = pixels_input(payload["images"], payload.get("datatype", "FP32"))
    outputs = None
    if payload.get("classification"):
        outputs = [triton.InferRequestedOutput("probabilities", class_count=payload["classification"])]
    result = client.infer(MODEL, [tensor], outputs=outputs, request_id=payload.get("id", ""))
    response = result.get_response()
    array = result.as_numpy("probabilities")
    values = [[v.decode() for v in row] for row in array] if array.dtype == np.object_ else array.tolist()
    return {
        "id": response.id,
        "model_version": response.model_version,
        "probabilities": values,
        "datatype": response.outputs[0].datatype,
        "shape": list(response.outputs[0].shape),
    }


def async_infer(client, payload):
    done = queue.Queue()
    for i, image in enumerate(payload["images"]):
        client.async_infer(
            MODEL, [pixels_input([image])], callback=lambda result, error: done.put((result, error)), request_id=str(i)
        )
    answers = {}
    for _ in payload["images"]:
        result, error = done.get(timeout=60)
        if error is not None:
            raise error
        answers[result.get_response().id] = result.as_numpy("probabilities")[0].tolist()
    return {"answers": [answers[str(i)] for i in range(len(payload["images"]))]}


def stream(client, payload):
    replies = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    for i, image in enumerate(payload["images"]):
        client.async_stream_infer(MODEL, [pixels_input([image])], request_id=f"s{i}")
    bad = triton.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    client.async_stream_infer(MODEL, [bad], request_id="bad")
    client.stop_stream()
    return {"replies": drained(replies)}


def stream_with_a_pause(client, payload):
    """One image, ``pause_s`` of silence on the open stream (only keepalive pings), another image."""
    replies = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    client.async_stream_infer(MODEL, [pixels_input([payload["images"][0]])], request_id="before")
    time.sleep(payload["pause_s"])
    try:
        client.async_stream_infer(MODEL, [pixels_input([payload["images"][1]])], request_id="after")
    except InferenceServerException:
        pass  # the stream had already failed; its callback got the reason
    client.stop_stream()
    return {"replies": drained(replies)}


def drained(replies: queue.Queue) -> list[dict]:
    """A stream's callbacks so far: each reply's id and top class, or its error."""
    out = []
    while not replies.empty():
        result, error = replies.get()
        if error is not None:
            out.append({"error": str(error)})
        else:
            out.append({"id": result.get_response().id, "top": int(np.argmax(result.as_numpy("probabilities")[0]))})
    return out


def load_unload(client, payload):
    client.unload_model(MODEL)
    after_unload = client.is_model_ready(MODEL)
    try:
        client.infer(MODEL, [pixels_input(payload["images"])])
        infer_after_unload = None
    except InferenceServerException as exc:
        infer_after_unload = failure(exc)
    index_unloaded = MessageToDict(client.get_model_repository_index())
    client.load_model(MODEL)
    return {
        "after_unload": after_unload,
        "infer_after_unload": infer_after_unload,
        "index_unloaded": index_unloaded,
        "after_load": client.is_model_ready(MODEL),
        "index_loaded": MessageToDict(client.get_model_repository_index()),
    }


def statistics(client, payload):
    return MessageToDict(client.get_inference_statistics(MODEL))


def error(client, payload):
    """One request that must fail; returns tritonclient's status and message."""
    kind = payload["kind"]
    try:
        if kind == "wrong_datatype":
            tensor = triton.InferInput("input", [1, 1, 8, 8], "INT32")
            tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.int32))
            client.infer(MODEL, [tensor])
        elif kind == "wrong_shape":
            client.infer(MODEL, [pixels_input(np.zeros((1, 1, 28, 28)))])
        elif kind == "unknown_model":
            client.infer("nope", [pixels_input(np.zeros((1, 1, 8, 8)))])
        elif kind == "unknown_version":
            client.infer(MODEL, [pixels_input(np.zeros((1, 1, 8, 8)))], model_version="9")
        elif kind == "unsupported_parameter":
            client.infer(MODEL, [pixels_input(np.zeros((1, 1, 8, 8)))], parameters={"fancy": 1})
        elif kind == "too_big_batch":
            client.infer(MODEL, [pixels_input(np.zeros((payload["n"], 1, 8, 8)))])
        elif kind == "shared_memory":
            client.get_system_shared_memory_status()
        elif kind == "bad_image":
            client.infer(MODEL, [bytes_input([base64.b64encode(b"not an image").decode()])])
        else:
            raise ValueError(kind)
    except InferenceServerException as exc:
        return failure(exc)
    return {"status": "no error"}


SCENARIOS = {
    f.__name__: f
    for f in (health, metadata, infer, async_infer, stream, stream_with_a_pause, load_unload, statistics, error)
}

if __name__ == "__main__":
    url, scenario = sys.argv[1], sys.argv[2]
    payload = json.load(sys.stdin)
    keepalive = None
    if "keepalive_ms" in payload:  # what a user turning tritonclient's keepalive on would pass
        keepalive = triton.KeepAliveOptions(
            keepalive_time_ms=payload["keepalive_ms"],
            keepalive_permit_without_calls=True,
            http2_max_pings_without_data=0,
        )
    with triton.InferenceServerClient(url, keepalive_options=keepalive) as client:
        print(json.dumps(SCENARIOS[scenario](client, payload)))
