"""What the first batch of each size costs a replica, against the second of the same size.

Loads a model version through ``ModelRunner`` (as a replica does: the graph warmed at 1 and 2 images, or
with ``--warm-up-to N`` every batch size up to N, as a replica on a GPU does for the batcher's maximum),
then for each batch size 3..``--max-batch`` times one ``predict`` and a second one right after (wall
milliseconds; ``predict`` waits for the device, since it returns the probabilities on the host). The
extra time of first calls is what the first requests of each size would wait for.

Run: .venv/bin/python scripts/first_batch_cost.py --model resnet_style --device cuda [--warm-up-to 32]
(``resnet_style`` is the benchmarks' random-weight ResNet-style CNN at 3x224x224, built on the fly.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convray.workers.replica import ModelRunner  # noqa: E402
from tests.bench.run import make_resnet_style_repo  # noqa: E402


def wall_ms(runner: ModelRunner, pixels: np.ndarray) -> float:
    """Wall milliseconds of one ``predict``."""
    started = time.perf_counter()
    runner.predict(pixels)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    """Print the first and second call of each batch size, then the totals as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", default="models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--graph", default="auto", choices=["auto", "frozen", "compiled", "eager"])
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--warm-up-to", type=int, default=2, help="the replica's max_batch_size (GPU warm-up)")
    args = parser.parse_args()
    repo = args.model_repo
    if args.model == "resnet_style":
        repo = tempfile.mkdtemp(prefix="first-batch-")
        make_resnet_style_repo(Path(repo))
    started = time.perf_counter()
    runner = ModelRunner(
        repo, args.model, 1, device=args.device, amp=args.amp, threads=1, graph=args.graph,
        max_batch_size=args.warm_up_to,
    )  # fmt: skip
    load_s = time.perf_counter() - started
    shape = tuple(runner.describe()["input_shape"])
    rows = []
    for size in range(3, args.max_batch + 1):
        pixels = np.zeros((size, *shape), np.uint8)
        rows.append((size, wall_ms(runner, pixels), wall_ms(runner, pixels)))
    print(f"{args.model} on {runner.device}, {runner.graph} graph, amp {args.amp}, warmed up to {args.warm_up_to}: "
          f"load {load_s:.2f} s")  # fmt: skip
    print("  ".join(f"{size}: {first:.2f}/{second:.2f}" for size, first, second in rows))
    extra = [first - second for _, first, second in rows]
    summary = {
        "model": args.model,
        "device": str(runner.device),
        "graph": runner.graph,
        "amp": args.amp,
        "warm_up_to": args.warm_up_to,
        "load_s": round(load_s, 3),
        "extra_first_call_ms_total": round(sum(extra), 2),
        "extra_first_call_ms_max": round(max(extra), 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
