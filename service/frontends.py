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

import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from convray.service.config import Settings
from convray.service.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)
ORPHAN_CHECK_S = 1.0  # how often a front end checks that its supervisor is still there
STOP_MARGIN_S = 30.0  # beyond each front end's drain grace, before a front end that has not stopped is killed
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PLACEMENT_REFUSED = "the replicas cannot all be placed: %s (--ray-num-cpus, --frontends)"  # an embedded Ray's shortfall


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

    Every front end starts ``replicas`` replicas of each of the repository's ``models``. A GPU share below one
    must fit on one GPU, so GPUs hold whole numbers of replicas (three of 0.4 need two GPUs, not 1.2). A version
    switch needs room for twice as many, which is not counted here (a switch that does not fit fails and leaves
    the old version serving).
    """
    workers, count = settings.workers, settings.server.frontends
    replicas = count * models * workers.replicas
    shape = f"{count} front ends x {models} model(s) x {workers.replicas} replica(s)"
    cpus, have_cpus = replicas * workers.cpus_per_replica, available.get("CPU", 0.0)
    if cpus > have_cpus + 1e-9:
        return (
            f"{shape} x {workers.cpus_per_replica:g} CPU (--cpus-per-replica) = {cpus:g} CPU, "
            f"but the Ray cluster has {have_cpus:g}"
        )
    each, have_gpus = workers.gpus_per_replica, available.get("GPU", 0.0)
    if each == 0:
        return None
    per_gpu = int(1 / each + 1e-9)  # replicas one GPU holds (a share is at most 1: a replica uses one GPU)
    gpus = math.ceil(replicas / per_gpu)
    if gpus > have_gpus + 1e-9:
        return (
            f"{shape} x {each:g} GPU (--gpus-per-replica, {per_gpu} to a GPU) = {gpus:g} GPU, "
            f"but the Ray cluster has {have_gpus:g}"
        )
    return None


def run_frontends(settings: Settings, log_level: str) -> int:
    """Start or join Ray, run ``settings.server.frontends`` front ends until a stop signal; the exit code."""
    import ray

    from convray.workers import cluster
    from convray.workers.repository import ModelRepository

    problem = _ports_taken(settings) or _unreadable_security_files(settings)
    if problem:
        log.error("%s", problem)
        return EXIT_FAILED
    workers = settings.workers
    models = len(ModelRepository(settings.models.model_repo).model_names())
    if workers.ray_address is None and workers.ray_num_cpus is not None:
        # The CPUs an embedded Ray will have are known before it starts (seconds): refused here, at once. Its GPUs
        # are Ray's to detect, so they are checked once it is up.
        shortfall = missing_resources(settings, max(models, 1), {"CPU": workers.ray_num_cpus, "GPU": math.inf})
        if shortfall:
            log.error(PLACEMENT_REFUSED, shortfall)
            return EXIT_USAGE
    # A stop signal from here on stops the group cleanly, whatever it is doing.
    stopping = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stopping.set())
    where = workers.ray_address or "an embedded local Ray"
    log.info("%s for %d front ends", f"joining Ray at {where}" if workers.ray_address else "starting a local Ray",
             settings.server.frontends)  # fmt: skip
    try:
        ray_address = _connect(workers.ray_address, workers.ray_num_cpus, workers.ray_connect_timeout_s, stopping)
    except TimeoutError:
        log.error(
            "could not connect to %s within %g s (--ray-address, --ray-connect-timeout-s)%s",
            where,
            workers.ray_connect_timeout_s,
            cluster.join_timeout_hint(workers.ray_address),
        )
        logging.shutdown()
        os._exit(EXIT_FAILED)  # the join is still under way in its thread, and Ray's exit hooks would wait on it
    except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable cluster)
        log.error("could not connect to %s: %s", where, exc)
        return EXIT_FAILED
    try:
        if stopping.is_set():
            log.info("stopped before any front end started")
            return EXIT_OK
        shortfall = missing_resources(settings, max(models, 1), ray.cluster_resources())
        if shortfall and workers.ray_address is None:
            log.error(PLACEMENT_REFUSED, shortfall)
            return EXIT_USAGE  # as `convray train` asking an embedded Ray for more than it has: the flags' fault
        if shortfall:
            log.warning("the replicas do not fit the cluster as it is (its autoscaler may add nodes): %s", shortfall)
        return _supervise(settings, ray_address, log_level, stopping)
    finally:
        ray.shutdown()


def _ports_taken(settings: Settings) -> str | None:
    """Whether something already listens on the gRPC, health or a metrics port, as a message; None when all are free.

    The front ends bind with SO_REUSEPORT, which Linux grants next to any other socket of this user that has it
    (gRPC servers set it by default, another group does): they would share the port with it and might get none
    of its connections. A bind without it fails wherever anything listens, so it is tried once first. Each front
    end's own metrics port is checked too: taken, it failed that front end only once Ray had started, seconds in.
    """
    server = settings.server
    metrics = [(server.metrics_host, server.metrics_port_of(i), "--metrics-host") for i in range(server.frontends)]
    for host, port, host_flag in [(server.host, server.port, "--host"), (server.host, server.health_port, "--host"),
                                  *metrics]:  # fmt: skip
        if not port:
            continue
        try:
            failures = bind_failures(host, port)
        except OSError as exc:
            return f"cannot resolve {host_flag} {host}: {exc}"
        if failures:
            return f"cannot serve on {host}:{port}: {failures[0][1].strerror} (another server there?)"
    return None


def bind_failures(host: str, port: int, reuse_port: bool = False) -> list[tuple[str, OSError]]:
    """Each address ``host`` resolves to on which ``port`` cannot be bound now, with the error.

    Each is probed as grpc binds (SO_REUSEADDR; IPv6 only on IPv6 addresses; SO_REUSEPORT with ``reuse_port``)
    and closed at once. ``host`` may be in gRPC's spelling ("[::]").

    Raises:
        OSError: ``host`` does not resolve.
    """
    failures = []
    resolved = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in resolved:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no obstacle
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            failures.append((address[0], exc))
    return failures


def _unreadable_security_files(settings: Settings) -> str | None:
    """A TLS or token file every front end would fail on, said once here rather than by each after Ray's start."""
    from convray.service.security import read_token, server_credentials

    try:
        server_credentials(settings.security)
        if settings.security.auth_token_file is not None:
            read_token(settings.security.auth_token_file)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _connect(address: str | None, num_cpus: int | None, timeout_s: float, stopping: threading.Event) -> str:
    """``cluster.connect``, giving up after ``timeout_s`` when joining a cluster (TimeoutError).

    An embedded Ray starts on this, the main, thread: Ray stops its GCS and raylet when the thread that started
    them ends, and the main thread lasts as long as the process (started from another thread that stays, this
    process was seen to abort as it exited). A stop signal meanwhile sets ``stopping`` (the caller stops once
    Ray is up), not Ray's own handler, and the handlers are put back after Ray's core worker has added its own.
    """
    from convray.workers import cluster

    if address is None:
        try:
            with cluster.own_sigterm_handler():
                return cluster.connect(None, num_cpus)
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda *_: stopping.set())
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


def _supervise(settings: Settings, ray_address: str, log_level: str, stopping: threading.Event) -> int:
    count = settings.server.frontends
    # Spawned, not forked: this process runs Ray's and gRPC's threads, which a fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_run_one,
            args=(
                frontend_settings(settings, i, ray_address),
                FrontendMember(i, count, ray_embedded=settings.workers.ray_address is None),
                log_level,
                os.getpid(),
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
        log.info("%d front ends starting on gRPC port %s:%d; Ray at %s", count, server.host, server.port, ray_address)
        while True:
            ended = wait([p.sentinel for p in processes], timeout=0.5)
            if stopping.is_set():  # a stop signal (with Ctrl-C the front ends got it too, and may be gone already)
                _stop_all(processes, settings.server.drain_grace_s + STOP_MARGIN_S)
                # Ended by the signal itself: a front end still starting Python, with nothing to drain yet.
                stopped = all(p.exitcode in (0, -signal.SIGTERM, -signal.SIGINT) for p in processes)
                exit_code = EXIT_OK if stopped else EXIT_FAILED
                break
            if ended:  # a front end stopped on its own: the group is no longer what was asked for
                gone = next(p for p in processes if p.sentinel in ended)
                gone.join()
                log.error("front end %d exited with code %s: stopping the others", frontend_number(gone), gone.exitcode)
                _stop_all(processes, settings.server.drain_grace_s + STOP_MARGIN_S)
                exit_code = gone.exitcode if gone.exitcode and gone.exitcode > 0 else EXIT_FAILED
                break
    finally:
        for process in processes:  # only on an error above: stopped processes are already gone
            if process.is_alive():
                process.kill()
    log.info("stopped %d front ends", count)
    return exit_code


def frontend_number(process: Any) -> int:
    """The number, from 1, in a front end's process name (``convray-frontend-<n>``), as the logs count them."""
    return int(process.name.rsplit("-", 1)[1])


def _stop_all(processes: list[Any], timeout_s: float) -> None:
    """SIGTERM every live front end (each drains as on its own), wait up to ``timeout_s`` in all, kill the rest."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("front end %d did not stop within %.0f s: killing it", frontend_number(process), timeout_s)
            process.kill()
            process.join()


def _run_one(settings: Settings, member: FrontendMember, log_level: str, supervisor_pid: int) -> None:
    """A front end's process: one ordinary server, told it is one of a group."""
    # A stop signal from now until the server can drain waits for it (service.server.serve unblocks them),
    # instead of killing a front end half-started.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s frontend-{member.index + 1} %(name)s: %(message)s"
    )
    # Watching before anything slow is imported: a supervisor killed meanwhile is noticed all the same.
    watch = threading.Thread(
        target=_stop_when_orphaned, args=(supervisor_pid, member.ray_embedded), name="convray-parent-watch", daemon=True
    )
    watch.start()
    from convray.service import event_loop
    from convray.service.server import serve

    raise SystemExit(event_loop.run(serve(settings, member), settings.server.event_loop))


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
