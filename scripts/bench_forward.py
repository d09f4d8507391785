"""The replica's forward pass alone, per graph: CPU milliseconds per batch at a few batch sizes.

Loads a model version through ``ModelRunner`` once per graph (``workers.forward``: eager, frozen, and
compiled with ``--compiled``), on CPU with one torch thread as a replica has by default, and times
``predict`` (uint8 in, probabilities out) on random pixels: the median of 7 rounds of ``--calls`` calls.

Run: .venv/bin/python scripts/bench_forward.py [--model-repo models --model digits --batches 1,5,16,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from convray.workers.replica import ModelRunner


def cpu_ms_per_batch(runner: ModelRunner, batch: int, calls: int) -> float:
    """Median over 7 rounds of the process CPU milliseconds one ``predict`` of ``batch`` images takes."""
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, *runner.describe()["input_shape"]), np.uint8)
    for _ in range(10):
        runner.predict(pixels)
    rounds = []
    for _ in range(7):
        started = time.process_time()
        for _ in range(calls):
            runner.predict(pixels)
        rounds.append((time.process_time() - started) / calls * 1e3)
    return statistics.median(rounds)


def main() -> None:
    """Time each graph and print a line per graph, then all figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default="models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--batches", default="1,5,16,32", help="comma-separated batch sizes")
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--compiled", action="store_true", help="also torch.compile (needs a C++ compiler)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    graphs = ["eager", "frozen"] + (["compiled"] if args.compiled else [])
    results = {}
    for graph in graphs:
        runner = ModelRunner(args.model_repo, args.model, 1, device="cpu", threads=1, graph=graph)
        results[graph] = {b: cpu_ms_per_batch(runner, b, args.calls) for b in map(int, args.batches.split(","))}
        print(graph, "  ".join(f"batch {b}: {ms:.3f} ms" for b, ms in results[graph].items()), flush=True)
    print(json.dumps({"model": args.model, "cpu_ms_per_batch": results}))


if __name__ == "__main__":
    main()
