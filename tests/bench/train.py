"""Training benchmark (not part of the suite): `convray train` end to end, single process vs Ray Train.

Each run is a fresh `convray train` process (Ray start and shutdown included), timed from outside, in
the order: --workers 0 (the single-process loop), --workers 1, --workers 2, repeated --repeats times
and interleaved, so a busy machine slows every variant alike. Prints one Markdown row per run and the
medians with the ratio of each Ray Train variant to the single-process loop.

    .venv/bin/python tests/bench/train.py --epochs 15 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONVRAY = str(Path(sys.executable).parent / "convray")


def run(workers: int, epochs: int, root: Path) -> tuple[float, float, float]:
    """(wall seconds, held-out accuracy, mean img/s of the last 5 epochs) of one `convray train`."""
    args = [CONVRAY, "train", "--dataset", "digits", "--workers", str(workers), "--epochs", str(epochs)]
    args += ["--model-repo", str(root / "repo"), "--model-name", "digits", "--storage-path", str(root / "runs")]
    if workers == 0:
        args += ["--threads", "1"]  # what one Ray Train worker with 1 CPU gets
    started = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    accuracy = float(re.search(r"held-out accuracy ([0-9.]+)", result.stdout).group(1))
    rates = [float(r.replace(",", "")) for r in re.findall(r"([0-9,]+) img/s", result.stdout)]
    return wall, accuracy, statistics.mean(rates[-5:])


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    walls: dict[int, list[float]] = {w: [] for w in args.workers}
    print("| run | workers | wall s | held-out acc | img/s (last 5 epochs) | load avg (1 min) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for workers in args.workers:
                wall, accuracy, rate = run(workers, args.epochs, Path(tmp))
                walls[workers].append(wall)
                load = os.getloadavg()[0]
                print(f"| {repeat + 1} | {workers} | {wall:.1f} | {accuracy:.4f} | {rate:,.0f} | {load:.1f} |")
    base = statistics.median(walls[0]) if 0 in walls else None
    for workers, values in walls.items():
        median = statistics.median(values)
        ratio = f", {median / base:.1f}x the single-process loop" if base and workers else ""
        print(f"workers={workers}: median {median:.1f} s over {len(values)} runs{ratio}")


if __name__ == "__main__":
    main()
