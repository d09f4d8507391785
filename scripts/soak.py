"""A bounded soak: mixed good and bad traffic against a real server on loopback, then a report.

Starts its own server (embedded local Ray, OIP REST on too), sends traffic from a few client threads for
--seconds (native gRPC, and OIP over HTTP/REST on kept-alive connections), samples the memory of the front
end and of the replica processes, and prints requests sent, answered and failed by status code, plus memory
at the start and end of the steady phase.

Run: .venv/bin/python scripts/soak.py --seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import io
import json
import os
import random
import threading
import time

import grpc
import numpy as np
import psutil
from PIL import Image

from convray.service.config import Settings
from convray.service.oip_codec import IMAGE_INPUT, PIXELS_INPUT
from convray.service.server import ConvrayServer
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc
from convray.workers.data import load_digits_split


def traffic() -> list[tuple[str, pb.ClassifyRequest]]:
    """Good PNG/JPEG digits and the usual bad requests, labelled by what they are."""
    _, held_out = load_digits_split()
    good = []
    for pixels in held_out.images[:64]:
        for fmt in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            Image.fromarray(pixels[0], mode="L").resize((32, 32)).save(buffer, format=fmt)
            good.append(("good", pb.ClassifyRequest(image=buffer.getvalue())))
    bad = [
        ("empty", pb.ClassifyRequest(image=b"")),
        ("garbage", pb.ClassifyRequest(image=os.urandom(512))),
        ("truncated", pb.ClassifyRequest(image=good[0][1].image[:40])),
        ("unknown model", pb.ClassifyRequest(image=good[0][1].image, model="nope")),
        ("bad version", pb.ClassifyRequest(image=good[0][1].image, version=-1)),
        ("huge top_k", pb.ClassifyRequest(image=good[0][1].image, top_k=10**6)),
    ]
    return good * 3 + bad  # about 1 request in 65 is bad


def rest_traffic() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """REST inference bodies, good (PNG bytes as binary data, FP32 pixels as JSON) and bad, labelled by what they are.

    Each is (kind, path, body, headers).
    """
    _, held_out = load_digits_split()
    infer = "/v2/models/digits/infer"
    good = []
    for pixels in held_out.images[:32]:
        buffer = io.BytesIO()
        Image.fromarray(pixels[0], mode="L").save(buffer, format="PNG")
        image = buffer.getvalue()
        header = json.dumps({"inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(image) + 4}}],
                             "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
        body = header + len(image).to_bytes(4, "little") + image
        good.append(("good binary", infer, body, {"Inference-Header-Content-Length": str(len(header))}))
        values = pixels[0].astype(np.float32).ravel().tolist()  # 0..255
        tensor = {"inputs": [{"name": PIXELS_INPUT, "datatype": "FP32", "shape": [1, 1, 8, 8], "data": values}]}
        good.append(("good json", infer, json.dumps(tensor).encode(), {}))
    bad = [
        ("not json", infer, b"{", {}),
        ("unknown model", "/v2/models/nope/infer", good[1][2], {}),
        (
            "wrong shape",
            infer,
            json.dumps({"inputs": [dict(tensor["inputs"][0], shape=[2], data=[0.0, 1.0])]}).encode(),
            {},
        ),
        ("short binary", infer, good[0][2][:-10], good[0][3]),
    ]
    return good * 4 + bad  # about 1 request in 65 is bad


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes, in MiB."""
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def main() -> None:
    """Run the soak and print its report as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8, help="native gRPC client threads")
    parser.add_argument("--rest-clients", type=int, default=2, help="OIP REST client threads")
    args = parser.parse_args()

    settings = Settings(
        server={"host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": None}, workers={"replicas": 2}
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(_start(settings), loop).result(300)
    replica_pids = asyncio.run_coroutine_threadsafe(_replica_pids(server), loop).result(60)
    front_end = [os.getpid()]
    requests, rest_requests = traffic(), rest_traffic()
    counts: collections.Counter[str] = collections.Counter()
    sent = [0]
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while time.monotonic() < stop:
                kind, request = rng.choice(requests)
                with lock:
                    sent[0] += 1
                try:
                    stub.Classify(request, timeout=30)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                with lock:
                    counts[f"{kind}: {outcome}"] += 1

    def rest_client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)  # kept alive
        while time.monotonic() < stop:
            kind, path, body, headers = rng.choice(rest_requests)
            with lock:
                sent[0] += 1
            try:
                connection.request("POST", path, body, headers)
                reply = connection.getresponse()
                reply.read()
                outcome = f"HTTP {reply.status}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                connection.close()
            with lock:
                counts[f"rest {kind}: {outcome}"] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=rest_client, args=(1000 + i,)) for i in range(args.rest_clients)]
    for t in threads:
        t.start()
    time.sleep(min(10, args.seconds / 4))  # warm-up: allocator pools and caches fill
    samples = []
    while time.monotonic() < stop:
        samples.append((time.monotonic(), rss_mb(front_end), rss_mb(replica_pids)))
        time.sleep(2)
    for t in threads:
        t.join()
    asyncio.run_coroutine_threadsafe(server.stop(5), loop).result(60)
    times = np.array([s[0] for s in samples])
    front = np.array([s[1] for s in samples])
    workers = np.array([s[2] for s in samples])
    per_minute = (lambda ys: float(np.polyfit((times - times[0]) / 60, ys, 1)[0])) if len(samples) > 2 else None
    # A leak keeps growing; allocator pools and caches grow early and flatten. The second half tells them apart.
    half = len(samples) // 2
    late_per_minute = (
        (lambda ys: float(np.polyfit((times[half:] - times[half]) / 60, ys[half:], 1)[0])) if half > 2 else None
    )
    answered = sum(counts.values())
    print(json.dumps({
        "seconds": args.seconds, "clients": args.clients, "rest_clients": args.rest_clients, "sent": sent[0],
        "answered": answered,
        "lost": sent[0] - answered, "requests_per_s": round(answered / args.seconds, 1),
        "by_kind_and_code": dict(sorted(counts.items())),
        "front_end_rss_mb": {"start": round(front[0], 1), "end": round(front[-1], 1),
                             "trend_mb_per_min": round(per_minute(front), 2) if per_minute else None,
                             "second_half_trend_mb_per_min": late_per_minute and round(late_per_minute(front), 2)},
        "replicas_rss_mb": {"start": round(workers[0], 1), "end": round(workers[-1], 1),
                            "trend_mb_per_min": round(per_minute(workers), 2) if per_minute else None,
                            "second_half_trend_mb_per_min": late_per_minute and round(late_per_minute(workers), 2)},
    }, indent=2))  # fmt: skip


async def _start(settings: Settings) -> ConvrayServer:
    server = ConvrayServer(settings)
    await server.start()
    await server.wait_ready()
    return server


async def _replica_pids(server: ConvrayServer) -> list[int]:
    pids = []
    for served in server.registry.served_versions():
        for actor in served.pool.actors:
            pids.append(int((await actor.describe.remote())["pid"]))
    return pids


if __name__ == "__main__":
    main()
