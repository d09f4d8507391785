"""Where a loaded node's CPU goes: client, front ends, replicas and Ray, per image, for one convray setup.

Starts `convray serve --frontends N` on the ResNet-style or digits model, drives it with `convray bench`
(several client processes, streams or unary calls), and over the middle of the run reads every process's
CPU time (psutil). It prints the cores each kind of process used and the CPU milliseconds each spent per
image the replicas ran in that window, the front ends' busiest threads, and the mean batch (both from the
front ends' Prometheus metrics). That says which part to make cheaper when a node runs out of CPU before its
GPU is busy (docs/benchmarks.md, "Fifth lease"). Linux only (thread names come from /proc).

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
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench import run  # noqa: E402 (the model repositories and the server helpers)

KINDS = ("client", "front end", "replica", "ray", "profiler", "other")


@dataclass(frozen=True)
class Sample:
    """One process (or thread) as a snapshot saw it: what it is, and the CPU seconds it had used by then."""

    kind: str
    cpu_s: float


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, name, command line) of every process now running."""
    return {pid: info for pid, (info, _) in processes_now().items()}


def processes_now() -> dict[int, tuple[tuple[int, str, str], psutil.Process]]:
    """pid -> ((parent pid, name, command line), the process) of every process now running."""
    found = {}
    for process in psutil.process_iter(["ppid", "name", "cmdline"]):
        info = process.info
        found[process.pid] = ((info["ppid"] or 0, info["name"] or "", " ".join(info["cmdline"] or ())), process)
    return found


def descends_from(pid: int, root: int, table: dict[int, tuple[int, str, str]]) -> bool:
    """Whether ``pid`` is ``root`` or one of its descendants, following the parents in ``table``."""
    seen = set()
    while pid in table and pid not in seen:
        if pid == root:
            return True
        seen.add(pid)
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


def cpu_seconds(process: psutil.Process) -> float | None:
    """User plus system CPU seconds a process has used; None once it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def front_end_threads(process: psutil.Process) -> dict[tuple[int, int], Sample]:
    """Each thread of a front end, (pid, tid) -> its name (as the kernel has it) and CPU seconds."""
    threads = {}
    try:
        listed = process.threads()
    except psutil.Error:
        return threads
    for thread in listed:
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:  # it ended meanwhile
            continue
        threads[(process.pid, thread.id)] = Sample(name, thread.user_time + thread.system_time)
    return threads


def snapshot(server: int, client: int) -> tuple[dict[int, Sample], dict[tuple[int, int], Sample]]:
    """Every running process's kind and CPU seconds, and each front-end thread's name and CPU seconds."""
    found = processes_now()
    table = {pid: info for pid, (info, _) in found.items()}
    processes, threads = {}, {}
    for pid, (_, process) in found.items():
        used = cpu_seconds(process)
        if used is None:  # it exited meanwhile
            continue
        kind = kind_of(pid, table, server, client)
        processes[pid] = Sample(kind, used)
        if kind == "front end":
            threads |= front_end_threads(process)
    return processes, threads


def cores_by_kind(before: dict, after: dict, elapsed_s: float) -> tuple[collections.Counter, collections.Counter]:
    """Cores each kind used between two snapshots (keyed alike), and how many of each kind exited in between.

    A process that started in between counts from zero. One that exited is missing from ``after``, so its
    seconds in the window are not counted: the caller must say so (a run whose clients ended before the second
    snapshot read 0.01 client cores).
    """
    cores: collections.Counter = collections.Counter()
    for key, now in after.items():
        was = before.get(key)
        cores[now.kind] += (now.cpu_s - (was.cpu_s if was else 0.0)) / elapsed_s
    exited = collections.Counter(before[key].kind for key in before.keys() - after.keys())
    return cores, exited


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


def profile(processes: dict[int, Sample], seconds: float, folder: Path) -> list[subprocess.Popen]:
    """Start py-spy on the busiest front end and replica, without pausing them (Python frames: with ``--native`` py-spy
    must pause the process it samples, and fell seconds behind on a replica)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("no py-spy on the PATH: no profiles")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, tuple[float, int]] = {}  # kind -> (CPU seconds, pid): the busiest process of each kind
    for pid, sample in processes.items():
        if sample.kind in {"front end", "replica"}:  # the supervisor of several front ends is never the busiest
            chosen[sample.kind] = max(chosen.get(sample.kind, (-1.0, 0)), (sample.cpu_s, pid))
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
    log, report_file = scratch / "serve.log", scratch / "bench.json"
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
             "--json", str(report_file), *(["--streaming"] if args.streaming else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        time.sleep(args.warmup + 1)
        batches_before = batches(metrics_ports)
        started = time.monotonic()
        before, threads_before = snapshot(server.pid, bench.pid)
        profilers = profile(before, args.seconds, args.profiles) if args.profiles else []
        time.sleep(args.seconds)
        after, threads_after = snapshot(server.pid, bench.pid)
        elapsed = time.monotonic() - started
        batches_after = batches(metrics_ports)
        for profiler in profilers:  # a profiler that falls behind may run on: the load has ended by then
            profiler.wait(timeout=120)
        output = bench.communicate(timeout=120)[0]
    finally:
        run.stop(server)
    print(output)
    if bench.returncode != 0:
        raise RuntimeError(f"convray bench exited {bench.returncode}")
    measured = json.loads(report_file.read_text())
    raw = None
    if args.raw:
        raw_run = subprocess.run(
            [sys.executable, str(run.ROOT / "tests/bench/raw_model.py"), "--model-repo", str(repo), "--model",
             args.model, "--device", "cuda" if args.gpus else "cpu", "--seconds", "2"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        raw = json.loads(raw_run.stdout.strip().splitlines()[-1])
    cores, exited = cores_by_kind(before, after, elapsed)
    if exited:
        print(f"warning: processes exited during the window, their CPU in it not counted: {dict(exited)}")
    threads, _ = cores_by_kind(threads_before, threads_after, elapsed)  # a thread's "kind" is its name
    by_thread: collections.Counter = collections.Counter()
    for name, used in threads.items():
        # Numbered pools (client.poll1...) as one. Threads that never name themselves keep the process's name
        # (python3: the event loop's and Python's own threads, and unnamed native ones).
        by_thread[re.sub(r"\d+$", "N", name)] += used
    count, images = (b - a for a, b in zip(batches_before, batches_after, strict=True))
    if images <= 0:
        raise RuntimeError("the replicas ran no image in the measured window: see the server's log, " + str(log))
    window_rate = images / elapsed  # the images the replicas ran in the window: what its CPU was spent on
    report = {
        "setup": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        | {"cpus": os.cpu_count()},
        "img_per_s": measured["images_per_s"],  # the whole run's, as convray bench measured it
        "window_img_per_s": round(window_rate, 1),
        "p50_ms": measured["latency_ms"]["p50"],
        "cores": {kind: round(cores[kind], 2) for kind in KINDS},
        "cpu_ms_per_image": {kind: round(1000 * cores[kind] / window_rate, 3) for kind in KINDS},
        "exited_in_window": dict(exited),
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
