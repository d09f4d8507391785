"""Classify latency with and without concurrent Explain calls, against a real `convray serve`.

Starts `convray serve` on free loopback ports (extra serve flags after `--`), waits for health, then
sends Classify calls one at a time from one client (closed loop) and reports p50/p90/p99 latency:
first alone, then while ``--explainers`` threads call Explain back to back (all blocks, top-3 CAMs).
Not part of the test suite. Results and the command: docs/benchmarks.md ("Explain under load").

Run: .venv/bin/python scripts/bench_explain.py --requests 1000 --explainers 1
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = (REPO_ROOT / "examples" / "digits" / "digit-3.png").read_bytes()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(channel: grpc.Channel, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Block until the server's health check says SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"server exited: {server.communicate()[1]}")
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    sys.exit("server did not become SERVING")


def classify_latencies_ms(stub: pb_grpc.ClassifierStub, count: int) -> list[float]:
    """Latency of ``count`` Classify calls made one after another, seen by the client."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        stub.Classify(pb.ClassifyRequest(image=IMAGE, top_k=3), timeout=30)
        latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


def summary(latencies: list[float]) -> str:
    """p50 / p90 / p99 in ms."""
    q = statistics.quantiles(latencies, n=100)
    return f"p50 {statistics.median(latencies):6.2f} ms  p90 {q[89]:6.2f} ms  p99 {q[98]:6.2f} ms"


def main() -> None:
    """Run both phases and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="Classify calls per phase")
    parser.add_argument("--explainers", type=int, default=1, help="threads calling Explain back to back")
    parser.add_argument("serve_flags", nargs="*", help="extra `convray serve` flags, after --")
    args = parser.parse_args()
    port = free_port()
    command = [str(Path(sys.executable).parent / "convray"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--no-metrics", *args.serve_flags]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, server)
            stub = pb_grpc.ClassifierStub(channel)
            classify_latencies_ms(stub, 100)  # warm-up
            alone = classify_latencies_ms(stub, args.requests)

            stop = threading.Event()
            explained = [0] * args.explainers

            def explain_loop(i: int) -> None:
                while not stop.is_set():
                    stub.Explain(pb.ExplainRequest(image=IMAGE, top_k=3), timeout=30)
                    explained[i] += 1

            threads = [threading.Thread(target=explain_loop, args=(i,)) for i in range(args.explainers)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            started, before = time.monotonic(), sum(explained)
            loaded = classify_latencies_ms(stub, args.requests)
            explain_rate = (sum(explained) - before) / (time.monotonic() - started)
            stop.set()
            for t in threads:
                t.join()
    finally:
        server.terminate()
        server.wait(60)
    print(f"serve flags: {' '.join(args.serve_flags) or '(defaults)'}; {args.requests} sequential Classify calls")
    print(f"Classify alone:                                 {summary(alone)}")
    print(f"Classify with {args.explainers} Explain loop(s) ({explain_rate:5.1f} Explain/s): {summary(loaded)}")
    print(f"p50 change: {statistics.median(loaded) - statistics.median(alone):+.2f} ms")


if __name__ == "__main__":
    main()
