"""Side-by-side benchmark: raw model, no-op gRPC floor, Ray Serve, convray; writes docs/benchmarks.md.

Every server is driven by the same `convray bench` client (single-image ModelInfer, FP32 or with
--datatype UINT8, closed loop) at concurrency 1 and 32, each point --seconds long, the whole set
--repeats times; medians are reported with ratios taken inside each repeat.
Run: make bench (or .venv/bin/python tests/bench/run.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import ray
import torch

from convray.workers.models import build_model
from convray.workers.repository import InputContract, ModelMetadata, ModelRepository, Normalisation
from convray.workers.spec import CNNSpec

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RESNET_STYLE = {
    "in_channels": 3,
    "blocks": [
        {"type": "conv", "filters": 32, "kernel_size": 7, "stride": 2, "padding": "same", "batch_norm": True},
        {"type": "pool", "kind": "max", "window": 2},
        {"type": "conv", "filters": 64, "kernel_size": 3, "stride": 2, "padding": "same", "batch_norm": True},
        {"type": "conv", "filters": 128, "kernel_size": 3, "stride": 2, "padding": "same", "batch_norm": True},
        {"type": "conv", "filters": 256, "kernel_size": 3, "stride": 2, "padding": "same", "batch_norm": True},
    ],
    "head": {"type": "gap_fc", "hidden": []},
    "num_classes": 10,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_resnet_style_repo(root: Path) -> None:
    """Publish the ResNet-style CNN (random weights: speed only) as model `resnet_style` version 1."""
    spec = CNNSpec.model_validate(RESNET_STYLE)
    torch.manual_seed(0)
    module = build_model(spec, 224, 224).eval()
    contract = InputContract(
        channels=3,
        height=224,
        width=224,
        colour_mode="RGB",
        normalisation=Normalisation(mean=[0.5] * 3, std=[0.25] * 3),
    )
    metadata = ModelMetadata(
        spec=spec,
        labels=[f"class{i}" for i in range(10)],
        input=contract,
        metrics={"accuracy": 0.0},
        training={"note": "random weights, for benchmarks only"},
    )
    ModelRepository(root).publish("resnet_style", metadata, module)


def wait_ready(port: int, model: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until one real ModelInfer succeeds (covers Ray start, deploy and model warm-up).

    Raises:
        RuntimeError: the server exited, or was not ready in ``timeout_s``.
    """
    from convray.oip import inference_pb2 as oip
    from convray.oip import inference_pb2_grpc as oip_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server on {port} exited with code {process.returncode}")
            try:
                metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=model), timeout=5)
                shape = [1, *list(metadata.inputs[0].shape)[1:]]
                request = oip.ModelInferRequest(model_name=model)
                request.inputs.add(name="input", datatype="FP32", shape=shape)
                request.raw_input_contents.append(bytes(4 * int(np.prod(shape))))
                stub.ModelInfer(request, timeout=30)
                return
            except grpc.RpcError:
                time.sleep(1)
    raise RuntimeError(f"server on {port} not ready in {timeout_s} s")


# convray variants: the default settings (direct transport), the two Ray transports, the eager graph, pacing,
# two replicas.
CONVRAY_VARIANTS = {
    "convray": [],
    "convray_compiled": ["--transport", "compiled-graph"],
    "convray_actor_call": ["--transport", "actor-call"],
    # The replica's forward pass as plain eager PyTorch instead of the frozen TorchScript graph.
    "convray_eager": ["--graph", "eager"],
    # Two batches in flight per replica whatever the timings (the default before the adaptive pacing).
    "convray_fixed_in_flight": ["--adaptive-in-flight", "false"],
    # One batch in flight per replica: fewer, larger batches.
    "convray_1_in_flight": ["--batches-in-flight-per-replica", "1"],
    # A longer batch delay than the benchmark's 1 ms (and Ray Serve's): fuller batches where the front end is the
    # limit, a longer wait where it is not (docs/deploy.md, "Batch delay"). Not the goals' comparison.
    "convray_delay_3ms": ["--max-batch-delay-ms", "3"],
    # Two replicas reserving half a CPU each, what one reserves (each still runs one torch thread). Runs 1-3
    # needed the half so both models' replicas fit on 2 cores; it stays so the runs compare.
    "convray_2_replicas": ["--replicas", "2", "--cpus-per-replica", "0.5"],
    # Mixed precision (GPU runs): bf16 autocast, which 'auto' serves with the eager graph.
    "convray_bf16": ["--amp", "bf16"],
    # GPU runs: each batch replays a CUDA graph captured at load instead of launching its ops one by one.
    "convray_cuda_graphs": ["--cuda-graphs", "true"],
    # `convray serve --frontends N` (N from run.py's --frontends): one command, N front ends on one port and one
    # Ray, against the separate servers the other targets start per front end; driven with several connections.
    "convray_group": [],
}
# For convray_group: connections in all per front end, shared among the client processes. The kernel gives each
# connection to one front end by a hash, so a few per front end spread the load roughly evenly.
CONNECTIONS_PER_FRONTEND = 4


def convray_command() -> list[str]:
    """The installed `convray` script, or the CLI module where only the package is on the path."""
    script = BIN / "convray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "convray.service.cli"]


def start(
    kind: str, port: int, repo: Path, model: str, batch: int, gpus: float, log: Path, group: int = 1
) -> subprocess.Popen:
    """Start a target server on ``port``, its output to ``log``; with ``gpus`` > 0 its replica holds that share
    of a GPU. ``group``: front ends of a ``convray_group``."""
    if kind == "noop":
        shape = "3,224,224" if model == "resnet_style" else "1,8,8"
        argv = [sys.executable, str(ROOT / "tests/bench/noop_server.py"), "--port", str(port), "--shape", shape]
    elif kind == "ray_serve":
        argv = [
            sys.executable,
            str(ROOT / "tests/bench/ray_serve_server.py"),
            "--port",
            str(port),
            "--model-repo",
            str(repo),
            "--model",
            model,
            "--max-batch-size",
            str(batch),
            "--batch-wait-ms",
            "1",
            "--gpus",
            str(gpus),
        ]
    else:
        argv = [
            *convray_command(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-metrics",
            "--model-repo",
            str(repo),
            "--default-model",
            model,
            "--max-batch-size",
            str(batch),
            "--max-batch-delay-ms",
            "1",
            "--replicas",
            "1",
            *(["--gpus-per-replica", str(gpus)] if gpus else []),
            *CONVRAY_VARIANTS[kind],
            # The group's replicas share one Ray, where the separate servers each have one of their own: each
            # reserves 1/N of a CPU (still one torch thread), so the group fits wherever the separate ones run.
            *(["--frontends", str(group), "--cpus-per-replica", f"{1 / group:g}"] if kind == "convray_group" else []),
        ]
    with log.open("ab") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a server's whole process group (it may have exited already: then only reap it)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except ProcessLookupError:
        process.wait()
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_group_ready(log: Path, group: int, process: subprocess.Popen, timeout_s: float = 600) -> None:
    """Wait until each of a ``convray serve --frontends`` group's front ends has logged that it is ready.

    Raises:
        RuntimeError: the group exited, or was not ready in ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while group > 1 and log.read_text(errors="replace").count("convray ready (front end") < group:
        if process.poll() is not None:
            raise RuntimeError(f"front-end group exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"front-end group not ready in {timeout_s} s")
        time.sleep(0.5)


def bench(
    ports: list[int],
    model: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    datatype: str,
    batch_size: int = 1,
    processes: int = 1,
    streaming: bool = False,
    connections: int = 1,
) -> dict:
    """One ``convray bench`` point's JSON report.

    Raises:
        RuntimeError: it failed (0 OK, a server gone...), with its output.
    """
    handle, name = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    out = Path(name)
    try:
        finished = subprocess.run(
            [
                *convray_command(),
                "bench",
                "--server",
                ",".join(f"127.0.0.1:{port}" for port in ports),
                "--api",
                "oip",
                "--payload",
                "tensor",
                "--datatype",
                datatype,
                "--batch-size",
                str(batch_size),
                "--processes",
                str(max(processes if concurrency >= processes else 1, len(ports))),
                "--model",
                model,
                "--max-error-fraction",  # a point with some errors is recorded with their counts, not as failed
                "1",
                "--concurrency",
                str(concurrency),
                "--duration",
                str(seconds),
                "--warmup",
                str(warmup),
                "--json",
                str(out),
                *(["--streaming"] if streaming else []),
                "--connections",
                str(connections),
            ],
            capture_output=True,
            text=True,
            timeout=600,  # on a timeout run() kills bench; its client processes exit when they see it gone
        )
        if finished.returncode != 0 or not out.stat().st_size:
            raise RuntimeError(f"convray bench exited {finished.returncode}: {finished.stdout}{finished.stderr}")
        return json.loads(out.read_text())
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"convray bench did not finish in {exc.timeout:g} s") from None
    except ValueError as exc:  # its JSON report is unreadable
        raise RuntimeError(f"convray bench wrote an unreadable report: {exc}") from None
    finally:
        out.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured point")
    parser.add_argument("--models", default="digits,resnet_style")
    parser.add_argument(
        "--targets",
        default="noop,ray_serve,convray",
        help=f"any of noop, ray_serve, {', '.join(CONVRAY_VARIANTS)} (each variant adds about 1.5 minutes)",
    )
    parser.add_argument("--variants-on", default="digits", help="models the convray variants also run on")
    parser.add_argument(
        "--out",
        default="bench-results.json",
        help="JSON file for every point (default: in the current folder; `make bench` writes the committed "
        "docs/benchmark-results.json, which an ad-hoc run should not overwrite)",
    )
    parser.add_argument(
        "--gpus", type=float, default=0.0, help="GPU share of each server's replica and the raw model's device (0: CPU)"
    )
    parser.add_argument(
        "--datatype", default="FP32", choices=["FP32", "UINT8"], help="of the pixel tensors every client sends"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per request (the Ray Serve baseline takes one only)"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="convray bench processes per loaded point (where one saturates, e.g. on a many-core GPU node)",
    )
    parser.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="servers per no-op and convray target, each its own process, port (and embedded Ray), driven as one "
        "at the loaded point only; on a GPU each convray replica holds --gpus divided by it",
    )
    parser.add_argument(
        "--loaded-concurrency",
        type=int,
        default=32,
        help="requests in flight at the loaded point, in all (with --frontends N, shared among the N servers)",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="clients send over ModelStreamInfer, one stream per concurrent request (not the Ray Serve baseline)",
    )
    parser.add_argument("--logs", default=None, help="folder for each server's output (default: a temporary one)")
    args = parser.parse_args()
    if args.batch_size != 1 and "ray_serve" in args.targets.split(","):
        parser.error("the Ray Serve baseline takes one image per request; leave it out of --targets for --batch-size")
    if args.streaming and "ray_serve" in args.targets.split(","):
        parser.error("the Ray Serve baseline serves unary ModelInfer only; leave it out of --targets for --streaming")
    out = Path(args.out)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="convray-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp())
    make_resnet_style_repo(scratch / "resnet_style" / "models")
    shutil.copytree(ROOT / "models" / "digits", scratch / "digits" / "models" / "digits")
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.gpus and torch.cuda.is_available() else None,
        },
        "datatype": args.datatype,
        "batch_size": args.batch_size,
        "client_processes": args.client_processes,
        "frontends": args.frontends,
        "streaming": args.streaming,
        "loaded_concurrency": args.loaded_concurrency,
        "points": [],
        "failures": [],
    }
    for model in args.models.split(","):
        # A repository of this model alone: convray serves every model in its repository, and each would
        # take a replica (and, on a GPU, its share of the card) that the baselines do not pay for.
        repo = scratch / model / "models"
        # Ratios are taken against the raw model as it runs by default; with convray_cuda_graphs on a GPU, the
        # raw model replaying the same CUDA graphs is measured too (raw_cuda_graphs), for the like-for-like ceiling.
        raw_targets = {"raw": []}
        if args.gpus and "convray_cuda_graphs" in args.targets.split(","):
            raw_targets["raw_cuda_graphs"] = ["--cuda-graphs"]
        for raw_target, raw_flags in raw_targets.items():
            raw = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tests/bench/raw_model.py"),
                    "--model-repo",
                    str(repo),
                    "--model",
                    model,
                    "--batch",
                    "32",
                    "--device",
                    "cuda" if args.gpus else "cpu",
                    *raw_flags,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            measured = json.loads(raw.stdout.strip().splitlines()[-1])
            results["points"].append({"model": model, "target": raw_target, **measured})
            print(model, raw_target, results["points"][-1], flush=True)
        for repeat in range(args.repeats):
            for target in args.targets.split(","):
                if target in CONVRAY_VARIANTS and target != "convray" and model not in args.variants_on.split(","):
                    continue
                # Several front ends, like front-end pods: the floor gets as many no-op processes. Ray Serve stays
                # as deployed by default (one proxy per node).
                frontends = 1 if target == "ray_serve" else args.frontends
                group = frontends if target == "convray_group" else 1  # front ends in one process's group
                ports = [free_port() for _ in range(frontends // group)]
                logs_of = [logs / f"{model}-{target}-{repeat}-{i}.log" for i in range(len(ports))]
                processes: list[subprocess.Popen] = []
                try:
                    try:
                        for port, log in zip(ports, logs_of, strict=True):
                            processes.append(start(target, port, repo, model, 32, args.gpus / frontends, log, group))
                        for port, process, log in zip(ports, processes, logs_of, strict=True):
                            wait_ready(port, model, process)
                            wait_group_ready(log, group, process)
                    except RuntimeError as error:  # one target failing to start does not lose the others
                        results["failures"].append({"model": model, "target": target, "repeat": repeat})
                        print(f"{model} {target}: {error}; its output is in {logs}", flush=True)
                        continue
                    for concurrency in (1, args.loaded_concurrency) if frontends == 1 else (args.loaded_concurrency,):
                        try:
                            report = bench(
                                ports,
                                model,
                                concurrency,
                                args.seconds,
                                args.warmup,
                                args.datatype,
                                args.batch_size,
                                args.client_processes,
                                args.streaming,
                                -(-CONNECTIONS_PER_FRONTEND * group // args.client_processes) if group > 1 else 1,
                            )
                        except RuntimeError as error:  # a failed point (the server died...) loses only itself
                            results["failures"].append(
                                {"model": model, "target": target, "repeat": repeat, "concurrency": concurrency}
                            )
                            print(f"{model} {target} c={concurrency}: {error}", flush=True)
                            continue
                        point = {
                            "model": model,
                            "target": target,
                            "repeat": repeat,
                            "frontends": frontends,
                            "concurrency": concurrency,
                            "req_per_s": report["requests_per_s"],
                            "img_per_s": report["images_per_s"],
                            "p50_ms": report["latency_ms"]["p50"],
                            "p99_ms": report["latency_ms"]["p99"],
                            "errors": report["errors"],
                            "client_cpu": report["client_cpu_fraction"],
                            # a client-bound point (the no-op floor's, most likely) shows here
                            "client_saturated": report["client_saturated"],
                            "notes": report["notes"],
                        }
                        results["points"].append(point)
                        print(point, flush=True)
                        out.write_text(json.dumps(results, indent=2) + "\n")  # a run cut short keeps its points
                finally:
                    for process in processes:
                        stop(process)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))


def select(points: list[dict], **match: object) -> list[dict]:
    """The points whose fields equal ``match``."""
    return [p for p in points if all(p.get(k) == v for k, v in match.items())]


def value(point: dict, key: str) -> float:
    """A point's ``key``; ``img_per_s`` falls back to req/s for results from before images per request varied."""
    return point.get("img_per_s", point["req_per_s"]) if key == "img_per_s" else point[key]


def median_of(points: list[dict], key: str, **match: object) -> float:
    values = [value(p, key) for p in select(points, **match)]
    return statistics.median(values) if values else float("nan")


def ratio(points: list[dict], a: str, b: str, **match: object) -> float:
    """Median over repeats of target a's img/s over target b's, each pair taken in the same repeat."""
    values = []
    for repeat in sorted({p["repeat"] for p in points if "repeat" in p}):
        pa, pb = select(points, target=a, repeat=repeat, **match), select(points, target=b, repeat=repeat, **match)
        if pa and pb and value(pb[0], "img_per_s"):
            values.append(value(pa[0], "img_per_s") / value(pb[0], "img_per_s"))
    return statistics.median(values) if values else float("nan")


def _cell(number: float, spec: str) -> str:
    return "-" if number != number else format(number, spec)  # NaN: no such point (c=1 with several front ends)


def summary(results: dict) -> str:
    """Markdown: medians per model, target and concurrency, and ratios within each repeat."""
    points, lines = results["points"], []
    loaded = results.get("loaded_concurrency", 32)
    if results.get("frontends", 1) > 1:
        lines += [f"{results['frontends']} front-end processes per no-op and convray target (c={loaded} only)", ""]
    for model in dict.fromkeys(p["model"] for p in points):
        raw = select(points, model=model, target="raw")[0]
        lines += [
            f"### {model}",
            "",
            f"raw model in one process: batch-1 forward {raw['batch1_ms']} ms, "
            f"{raw['batch32_img_per_s']:,.0f} img/s at batch 32",
            *(
                f"raw model replaying CUDA graphs: batch-1 forward {graphed['batch1_ms']} ms, "
                f"{graphed['batch32_img_per_s']:,.0f} img/s at batch 32"
                for graphed in select(points, model=model, target="raw_cuda_graphs")
            ),
            "",
            f"| server | c=1 img/s | c=1 p50 ms | c={loaded} img/s | c={loaded} p50 ms |",
            "|---|---|---|---|---|",
        ]
        targets = [t for t in ("noop", "ray_serve", *CONVRAY_VARIANTS) if select(points, model=model, target=t)]
        for target in targets:
            cells = [
                _cell(median_of(points, "img_per_s", model=model, target=target, concurrency=1), ",.0f"),
                _cell(median_of(points, "p50_ms", model=model, target=target, concurrency=1), ".2f"),
                _cell(median_of(points, "img_per_s", model=model, target=target, concurrency=loaded), ",.0f"),
                _cell(median_of(points, "p50_ms", model=model, target=target, concurrency=loaded), ".1f"),
            ]
            lines.append(f"| {target} | " + " | ".join(cells) + " |")
        lines.append("")
        for ours_target in (t for t in targets if t in CONVRAY_VARIANTS):
            for c in (c for c in (1, loaded) if select(points, model=model, target=ours_target, concurrency=c)):
                # A lone single-image request faces the raw model at batch 1; anything else, the raw model at batch 32.
                single = c == 1 and results.get("batch_size", 1) == 1
                raw_rate = raw["batch1_img_per_s"] if single else raw["batch32_img_per_s"]
                ours = median_of(points, "img_per_s", model=model, target=ours_target, concurrency=c)
                vs_serve = ratio(points, ours_target, "ray_serve", model=model, concurrency=c)
                serve = f"/ Ray Serve = {vs_serve:.2f}x, " if "ray_serve" in targets else ""
                floor_p50 = median_of(points, "p50_ms", model=model, target="noop", concurrency=c)
                our_p50 = median_of(points, "p50_ms", model=model, target=ours_target, concurrency=c)
                lines.append(
                    f"- {ours_target}, c={c}: {serve}"
                    f"/ no-op floor = {ratio(points, ours_target, 'noop', model=model, concurrency=c):.2f}x "
                    f"(p50 {our_p50 - floor_p50:+.2f} ms vs the floor), / raw model = {ours / raw_rate:.2f}x"
                )
        lines.append("")
    for failure in results.get("failures", []):
        lines.append(f"- did not start: {failure['target']} for {failure['model']} (repeat {failure['repeat']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
