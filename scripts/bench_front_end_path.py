r"""The front end's own work per ModelInfer request, without gRPC: its handler chain driven in one process.

Builds a real ``ConvrayServer`` (embedded Ray, one replica of the shipped ``digits`` model, the direct transport),
then calls its ModelInfer handler exactly as gRPC would after reading a request: the wrappers from its service table
(message checks, Ray gate), the OIP servicer, the batcher, the replica hop and the reply's serialisation, from
``--concurrency`` coroutines in a closed loop. It reports requests per second and the event-loop thread's CPU
per request: convray's own per-request cost, with gRPC's transport (the no-op floor's whole cost) left out and
no client process sharing the cores. Less noisy than an end-to-end run, so small changes to the hot path show;
they still have to show end to end (docs/benchmarks.md).

``--max-batch-size 4`` against the default 32 separates the per-batch cost from the per-request one: with every
coroutine always waiting, batches are always full.

Run: .venv/bin/python scripts/bench_front_end_path.py [--seconds 5] [--concurrency 32] [--max-batch-size 32]
     [--event-loop auto|uvloop|asyncio] [--profile out.prof]   (cProfile of the measured seconds; doubles the cost)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from pathlib import Path
from typing import Any, get_args

import grpc
import numpy as np

from convray.oip import inference_pb2 as oip
from convray.service import event_loop
from convray.service import server as server_module
from convray.service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"


class Context:
    """The little of ``grpc.aio.ServicerContext`` a successful ModelInfer uses: no deadline, no metadata."""

    def time_remaining(self) -> None:
        """No deadline."""
        return None

    def invocation_metadata(self) -> tuple[()]:
        """No metadata (so no bearer token: the benchmark's server asks for none)."""
        return ()

    def peer(self) -> str:
        """A loopback client."""
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = None) -> None:
        """A refused request stops the benchmark: it would measure the refusal, not the path."""
        raise RuntimeError(f"the call was refused: {code.name} {details}")


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method, self.invocation_metadata = method, ()


def digits_request() -> bytes:
    """One 8x8 FP32 image as ``convray bench --api oip --payload tensor`` sends it."""
    request = oip.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    pixels = np.random.default_rng(0).integers(0, 256, 64).astype("<f4")
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


async def main(seconds: float, concurrency: int, max_batch_size: int, profile: Path | None) -> None:
    """Start the server, warm it for a second, measure ``seconds``, print the figures, stop."""
    settings = Settings(
        server={"host": "127.0.0.1", "port": 0, "metrics_port": None},
        models={"model_repo": ROOT / "models", "default_model": "digits"},
        workers={"replicas": 1},
        batching={"max_batch_size": max_batch_size, "max_batch_delay_ms": 1.0},
    )
    server = server_module.ConvrayServer(settings)
    await server.start()
    await server.wait_ready()
    try:
        handler = server.services.service(_Details(METHOD))  # wrapped as grpc would run it (no token: no interceptor)
        payload, context = digits_request(), Context()
        done, stop_at = 0, 0.0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                reply = await handler.unary_unary(handler.request_deserializer(payload), context)
                handler.response_serializer(reply)
                done += 1

        for measured, length in ((False, 1.0), (True, seconds)):
            done, started, cpu = 0, time.perf_counter(), time.thread_time()
            stop_at = started + length
            profiler = cProfile.Profile() if measured and profile else None
            if profiler:
                profiler.enable()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
        wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
        print(f"{done} requests in {wall:.2f} s at concurrency {concurrency}, batches of up to {max_batch_size}: "
              f"{done / wall:,.0f} req/s; event-loop thread CPU {cpu / done * 1e6:.1f} us per request")  # fmt: skip
    finally:
        await server.stop(grace_s=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--event-loop", default="auto", choices=get_args(event_loop.EventLoopChoice), help="as serve's")
    args = parser.parse_args()
    event_loop.run(main(args.seconds, args.concurrency, args.max_batch_size, args.profile), args.event_loop)
