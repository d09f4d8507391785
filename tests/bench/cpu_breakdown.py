"""Where a loaded node's CPU goes: client, front ends, replicas and Ray, per request, for one convray setup.

Starts `convray serve --frontends N` on the ResNet-style or digits model, drives it with `convray bench`
(several client processes, streams or unary calls), and over the middle of the run reads every process's
CPU time from /proc. It prints the cores each kind of process used and the CPU milliseconds each spent
per request, the front ends' busiest threads, and the mean batch the replicas ran (from the front ends'
Prometheus metrics). That says which part to make cheaper when a node runs out of CPU before its GPU is
busy (docs/benchmarks.md, "Several front ends on a GPU node"). Linux only (reads /proc).

Run from the repository root, e.g. on a lent GPU machine (scripts/gpu_lease.sh breakdown):

    python tests/bench/cpu_breakdown.py --gpus 1 --frontends 8 --clients 16 --concurrency 256 --streaming
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402 (tests/bench/run.py: the model repositories and the server helpers)

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
KINDS = ("client", "front end", "replica", "ray", "profiler", "other")


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, name, command line) of every process now running."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry.name)] = (parent, name, cmdline)
    return table


def cpu_ticks(pid: int, thread: int | None = None) -> int:
    """User plus system clock ticks a process (or one of its threads) has used; 0 once it is gone."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def descends_from(pid: int, root: int, table: dict[int, tuple[int, str, str]]) -> bool:
    while pid in table and pid > 1:
        if pid == root:
            return True
        pid = table[pid][0]
    return pid == root


def kind_of(pid: int, table: dict[int, tuple[int, str, str]], server: int, client: int) -> str:
    """Which part of the setup a process is: Ray's own processes and workers by name, the rest by ancestry."""
    _, name, cmdline = table[pid]
    if name == "py-spy":
        return "profiler"
    if "ModelRunner" in cmdline or "ModelRunner" in name:
        return "replica"
    ray_script = re.search(r"/ray/(_private|dashboard|autoscaler)/", cmdline)
    if name in {"raylet", "gcs_server"} or cmdline.startswith("ray::") or ray_script:
        return "ray"
    if descends_from(pid, client, table):
        return "client"
    if descends_from(pid, server, table):
        return "front end"
    return "other"


def snapshot(server: int, client: int) -> tuple[dict[int, tuple[str, int]], dict[tuple[int, int], tuple[str, int]]]:
    """CPU ticks of every process by kind, and of each front-end thread (pid, tid) with its thread name."""
    table = process_table()
    processes, threads = {}, {}
    for pid in table:
        kind = kind_of(pid, table, server, client)
        processes[pid] = (kind, cpu_ticks(pid))
        if kind == "front end":
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with_name = (task / "comm").read_text().strip() if (task / "comm").exists() else "?"
                threads[(pid, int(task.name))] = (with_name, cpu_ticks(pid, int(task.name)))
    return processes, threads


def batches(metrics_ports: list[int]) -> tuple[float, float]:
    """(batches run, images in them) so far, summed over the front ends' `convray_batch_size` histograms."""
    count = total = 0.0
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("convray_batch_size_count"):
                    count += float(line.rsplit(" ", 1)[1])
                elif line.startswith("convray_batch_size_sum"):
                    total += float(line.rsplit(" ", 1)[1])
    return count, total


def profile(processes: dict[int, tuple[str, int]], seconds: float, folder: Path) -> list[subprocess.Popen]:
    """Start py-spy on the busiest front end and replica, without pausing them (Python frames: with ``--native`` py-spy
    must pause the process it samples, and fell seconds behind on a replica)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("no py-spy on the PATH: no profiles")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, tuple[int, int]] = {}  # kind -> (ticks, pid): the busiest process of each kind
    for pid, (kind, ticks) in processes.items():
        if kind in {"front end", "replica"}:  # the supervisor of several front ends is never the busiest
            chosen[kind] = max(chosen.get(kind, (-1, 0)), (ticks, pid))
    started = []
    for kind, (_, pid) in chosen.items():
        name = kind.replace(" ", "_")
        argv = [spy, "record", "-p", str(pid), "-r", "200", "-d", str(int(seconds)), "-f", "raw", "-o",
                str(folder / f"{name}.txt"), "--nonblocking"]  # fmt: skip
        with (folder / f"{name}.log").open("w") as log:
            started.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    return started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet_style", "digits"], default="resnet_style")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs the front ends' replicas share (0: CPU)")
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2, help="convray bench processes")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, in all")
    parser.add_argument("--datatype", choices=["UINT8", "FP32"], default="UINT8")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured, after --warmup")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--serve-args", default="", help="more `convray serve` flags, space-separated")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    parser.add_argument("--profiles", type=Path, help="folder for py-spy profiles of a front end and a replica")
    parser.add_argument("--raw", action="store_true", help="also measure the raw model (tests/bench/raw_model.py)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="convray-cpu-"))
    repo = scratch / "models"
    if args.model == "resnet_style":
        run.make_resnet_style_repo(repo)
    else:
        repo = run.ROOT / "models"
    port, metrics_port = run.free_port(), run.free_port()
    metrics_ports = [metrics_port + i for i in range(args.frontends)]
    argv = [*run.convray_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
            str(metrics_port), "--model-repo", str(repo), "--default-model", args.model, "--max-batch-size", "32",
            "--max-batch-delay-ms", "1", "--replicas", "1", "--frontends", str(args.frontends),
            "--cpus-per-replica", f"{1 / args.frontends:g}",
            *(["--gpus-per-replica", f"{args.gpus / args.frontends:g}"] if args.gpus else []),
            *args.serve_args.split()]  # fmt: skip
    log = scratch / "serve.log"
    with log.open("ab") as output:
        server = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run.wait_group_ready(log, args.frontends, server)
        run.wait_ready(port, args.model, server)
        bench = subprocess.Popen(
            [*run.convray_command(), "bench", "--server", f"127.0.0.1:{port}", "--api", "oip", "--payload",
             "tensor", "--datatype", args.datatype, "--model", args.model, "--concurrency", str(args.concurrency),
             "--processes", str(args.clients),
             "--connections", str(-(-run.CONNECTIONS_PER_FRONTEND * args.frontends // args.clients)),
             "--duration", str(args.seconds + 2), "--warmup", str(args.warmup), "--max-error-fraction", "1",
             *(["--streaming"] if args.streaming else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        time.sleep(args.warmup + 1)
        before, threads_before = snapshot(server.pid, bench.pid)
        batches_before = batches(metrics_ports)
        started = time.monotonic()
        profilers = profile(before, args.seconds, args.profiles) if args.profiles else []
        time.sleep(args.seconds)
        after, threads_after = snapshot(server.pid, bench.pid)
        batches_after = batches(metrics_ports)
        elapsed = time.monotonic() - started
        for profiler in profilers:  # a profiler that falls behind may run on: the load has ended by then
            profiler.wait(timeout=120)
        output = bench.communicate(timeout=120)[0]
    finally:
        run.stop(server)
    print(output)
    raw = None
    if args.raw:
        measured = subprocess.run(
            [sys.executable, str(run.ROOT / "tests/bench/raw_model.py"), "--model-repo", str(repo), "--model",
             args.model, "--device", "cuda" if args.gpus else "cpu", "--seconds", "2"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        raw = json.loads(measured.stdout.strip().splitlines()[-1])
    throughput = float(re.search(r"([\d,.]+) img/s", output).group(1).replace(",", ""))
    p50_ms = float(re.search(r"p50 ([\d.]+)", output).group(1))
    cores: dict[str, float] = collections.Counter()
    for pid, (kind, ticks) in after.items():
        cores[kind] += (ticks - before.get(pid, (kind, 0))[1]) / TICKS_PER_S / elapsed
    by_thread: dict[str, float] = collections.Counter()
    for key, (name, ticks) in threads_after.items():
        by_thread[re.sub(r"\d+$", "N", name)] += (ticks - threads_before.get(key, (name, 0))[1]) / TICKS_PER_S / elapsed
    count, images = (b - a for a, b in zip(batches_before, batches_after, strict=True))
    report = {
        "setup": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        | {"cpus": os.cpu_count()},
        "img_per_s": throughput,
        "p50_ms": p50_ms,
        "cores": {kind: round(cores[kind], 2) for kind in KINDS},
        "cpu_ms_per_image": {kind: round(1000 * cores[kind] / throughput, 3) for kind in KINDS},
        "front_end_threads_cores": {name: round(c, 2) for name, c in by_thread.most_common(8)},
        "mean_batch": round(images / count, 1) if count else None,
        "raw_model": raw,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
