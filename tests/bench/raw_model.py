"""The ceiling: the same model in one process, no server. Prints JSON.

Run: python tests/bench/raw_model.py --model-repo models --model digits
"""

import argparse
import json
import time

import numpy as np
import torch

from convray.workers.replica import ModelRunner, gpu_memory_bytes


def measure(runner: ModelRunner, batch: int, seconds: float) -> float:
    """Images per second through ModelRunner.predict (uint8 in, probabilities out) at a batch size."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *runner._expected_shape), dtype=np.uint8)
    runner.predict(pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner.predict(pixels)
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    """Batch-1 latency and batched throughput."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-repo", default="models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cuda-graphs", action="store_true", help="on a GPU, replay captured CUDA graphs")
    args = parser.parse_args()
    started = time.perf_counter()
    runner = ModelRunner(
        args.model_repo,
        args.model,
        1,
        device=args.device,
        threads=args.threads,
        max_batch_size=args.batch,
        cuda_graphs=args.cuda_graphs,
    )
    load_s = time.perf_counter() - started  # on a GPU: the warm-up of every batch size, and the graphs' capture
    peak_reserved = 0
    if runner.device.type == "cuda":
        peak_reserved = torch.cuda.max_memory_reserved()
        torch.cuda.empty_cache()  # what the replica holds, graphs included, without the warm-up's cached blocks
    _, held = gpu_memory_bytes(runner.device)
    single = measure(runner, 1, args.seconds)
    batched = measure(runner, args.batch, args.seconds)
    print(
        json.dumps(
            {
                "batch1_ms": round(1000 / single, 3),
                "batch1_img_per_s": round(single, 1),
                f"batch{args.batch}_img_per_s": round(batched, 1),
                "threads": torch.get_num_threads(),
                "cuda_graphs": runner.cuda_graphs,
                "load_s": round(load_s, 2),
                "gpu_memory_held_mib": round(held / 2**20, 1),
                "gpu_memory_peak_reserved_mib": round(peak_reserved / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
