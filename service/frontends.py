"""``convray serve --frontends N``: several front-end processes behind one gRPC port, on one Ray cluster.

One front end is one Python process, and on a GPU node it, not the GPU, is the limit for light models
(docs/benchmarks.md, "Several front ends on a GPU node"). This module starts (or joins) Ray once, then runs
N ordinary front ends (``service.server.serve``) in their own processes. They bind the same port with
SO_REUSEPORT, so the kernel gives each new connection to one of them; each front end has its own batchers
and replicas (``--replicas`` per model, each with ``--gpus-per-replica``) and its own metrics port, and
they share nothing else. This process only supervises: a stop signal is passed on to every front end,
and when one front end exits on its own the others are stopped and its exit code is returned.

What follows from per-connection balancing and separate registries (README, "Several front ends"):
a client with one connection reaches one front end, and loading or unloading models by RPC is refused,
since it would change only the front end the call reached (``--poll-interval-s`` serves new versions on all).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from convray.service.config import Settings
from convray.service.exit_codes import EXIT_FAILED, EXIT_OK

log = logging.getLogger(__name__)
ORPHAN_CHECK_S = 1.0  # how often a front end checks that its supervisor is still there
STOP_MARGIN_S = 30.0  # beyond each front end's drain grace, before a front end that has not stopped is killed


@dataclass(frozen=True)
class FrontendMember:
    """What a front end knows of the group it belongs to: its place in it (0-based), the group's size, its Ray."""

    index: int
    count: int
    ray_embedded: bool = False  # the supervisor started the Ray the front ends joined


def frontend_settings(settings: Settings, index: int, ray_address: str) -> Settings:
    """Settings of front end ``index``: the group's, joining ``ray_address``, with its own metrics port."""
    server = settings.server.model_copy(update={"frontends": 1, "metrics_port": settings.server.metrics_port_of(index)})
    workers = settings.workers.model_copy(update={"ray_address": ray_address})
    return settings.model_copy(update={"server": server, "workers": workers})


def missing_resources(settings: Settings, models: int, available: dict[str, float]) -> str | None:
    """Why the front ends' replicas cannot all be placed on ``available`` Ray resources, or None if they fit.

    Every front end starts ``replicas`` replicas of each of the repository's ``models``; a version switch
    needs room for twice as many, which is not counted here (a switch that does not fit fails and leaves the
    old version serving).
    """
    workers, count = settings.workers, settings.server.frontends
    replicas = count * models * workers.replicas
    for resource, each, flag in (("CPU", workers.cpus_per_replica, "--cpus-per-replica"),
                                 ("GPU", workers.gpus_per_replica, "--gpus-per-replica")):  # fmt: skip
        needed, have = replicas * each, available.get(resource, 0.0)
        if needed > have + 1e-9:
            return (
                f"{count} front ends x {models} model(s) x {workers.replicas} replica(s) x {each:g} {resource} "
                f"({flag}) = {needed:g} {resource}, but the Ray cluster has {have:g}"
            )
    return None


def run_frontends(settings: Settings, log_level: str) -> int:
    """Start or join Ray, run ``settings.server.frontends`` front ends until a stop signal; the exit code."""
    import ray

    from convray.workers.repository import ModelRepository

    workers = settings.workers
    where = workers.ray_address or "an embedded local Ray"
    try:
        ray_address = _connect(workers.ray_address, workers.ray_num_cpus, workers.ray_connect_timeout_s)
    except TimeoutError:
        log.error(
            "could not connect to %s within %g s (--ray-address, --ray-connect-timeout-s)",
            where,
            workers.ray_connect_timeout_s,
        )
        logging.shutdown()
        os._exit(EXIT_FAILED)  # the join is still under way in its thread, and Ray's exit hooks would wait on it
    except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable cluster)
        log.error("could not connect to %s: %s", where, exc)
        return EXIT_FAILED
    try:
        models = len(ModelRepository(settings.models.model_repo).model_names())
        shortfall = missing_resources(settings, max(models, 1), ray.cluster_resources())
        if shortfall and workers.ray_address is None:
            log.error("the replicas cannot all be placed: %s (--ray-num-cpus, --frontends)", shortfall)
            return EXIT_FAILED
        if shortfall:
            log.warning("the replicas do not fit the cluster as it is (its autoscaler may add nodes): %s", shortfall)
        return _supervise(settings, ray_address, log_level)
    finally:
        ray.shutdown()


def _connect(address: str | None, num_cpus: int | None, timeout_s: float) -> str:
    """``cluster.connect``, giving up after ``timeout_s`` when joining a cluster (TimeoutError).

    An embedded Ray is started on this, the main, thread: Ray stops its GCS and raylet when the thread that
    started them ends, and the main thread lasts as long as the process.
    """
    from convray.workers import cluster

    if address is None:
        return cluster.connect(None, num_cpus)
    outcome: list[str | BaseException] = []

    def join() -> None:
        try:
            outcome.append(cluster.connect(address, num_cpus))
        except Exception as exc:  # noqa: BLE001 (passed on to the caller as it is)
            outcome.append(exc)

    joining = threading.Thread(target=join, name="convray-ray-join", daemon=True)
    joining.start()
    joining.join(timeout_s)
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _supervise(settings: Settings, ray_address: str, log_level: str) -> int:
    count = settings.server.frontends
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Spawned, not forked: this process runs Ray's and gRPC's threads, which a fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_run_one,
            args=(
                frontend_settings(settings, i, ray_address),
                FrontendMember(i, count, ray_embedded=settings.workers.ray_address is None),
                log_level,
            ),
            name=f"convray-frontend-{i + 1}",
        )
        for i in range(count)
    ]
    exit_code = EXIT_OK
    try:
        for process in processes:
            process.start()
            log.info("front end %d of %d started (pid %d)", frontend_number(process), count, process.pid)
        server = settings.server
        log.info("%d front ends share gRPC port %s:%d; Ray at %s", count, server.host, server.port, ray_address)
        while True:
            ended = wait([p.sentinel for p in processes], timeout=0.5)
            if stopping.is_set():  # a stop signal (with Ctrl-C the front ends got it too, and may be gone already)
                _stop_all(processes, settings.server.drain_grace_s + STOP_MARGIN_S)
                exit_code = EXIT_OK if all(p.exitcode == 0 for p in processes) else EXIT_FAILED
                break
            if ended:  # a front end stopped on its own: the group is no longer what was asked for
                gone = next(p for p in processes if p.sentinel in ended)
                gone.join()
                log.error("front end %d exited with code %s: stopping the others", frontend_number(gone), gone.exitcode)
                _stop_all(processes, settings.server.drain_grace_s + STOP_MARGIN_S)
                exit_code = gone.exitcode if gone.exitcode and gone.exitcode > 0 else EXIT_FAILED
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:  # only on an error above: stopped processes are already gone
            if process.is_alive():
                process.kill()
    log.info("stopped %d front ends", count)
    return exit_code


def frontend_number(process: Any) -> int:
    """The number, from 1, in a front end's process name (``convray-frontend-<n>``), as the logs count them."""
    return int(process.name.rsplit("-", 1)[1])


def _stop_all(processes: list[Any], timeout_s: float) -> None:
    """SIGTERM every live front end (each drains as on its own), wait up to ``timeout_s``, kill what is left."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            log.error("front end %d did not stop within %.0f s: killing it", frontend_number(process), timeout_s)
            process.kill()
            process.join()


def _run_one(settings: Settings, member: FrontendMember, log_level: str) -> None:
    """A front end's process: one ordinary server, told it is one of a group."""
    from convray.service.server import serve

    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s frontend-{member.index + 1} %(name)s: %(message)s"
    )
    watch = threading.Thread(
        target=_stop_when_orphaned, args=(os.getppid(), member.ray_embedded), name="convray-parent-watch", daemon=True
    )
    watch.start()
    raise SystemExit(asyncio.run(serve(settings, member)))


def _stop_when_orphaned(parent_pid: int, ray_embedded: bool) -> None:
    """Stop this front end once its supervisor is gone (killed, so it passed no stop on).

    With a cluster of its own the front end drains as on SIGTERM. An embedded Ray was the supervisor's and
    went with it: nothing in flight can be answered any more, and Ray's shutdown would wait on its dead
    GCS, so the process exits at once (clients see the connection close, UNAVAILABLE, and retry).
    """
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_CHECK_S)
    if ray_embedded:
        log.error("the supervising process %d is gone, and its embedded Ray with it: exiting", parent_pid)
        logging.shutdown()
        os._exit(EXIT_FAILED)
    log.warning("the supervising process %d is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
