"""Build, start and drain the grpc.aio server: servicers, health, reflection, metrics endpoint.

The gRPC port opens at once, answering health checks with NOT_SERVING; Ray is connected and the
models are loaded in the background, then health flips to SERVING and one "ready" line is logged.
Afterwards a watchdog (``service.ray_watch``) checks that Ray still answers: readiness follows it, and
the server rejoins Ray or exits with code 1 when the cluster is lost (docs/reliability.md).

Health service names: ``""`` and the two API services report readiness; ``liveness`` is SERVING from the
moment the port opens until shutdown, whatever Ray does, for liveness probes.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib.metadata
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from convray.oip import inference_pb2, inference_pb2_grpc
from convray.service import __version__
from convray.service.config import ServerSettings, Settings, WorkerSettings
from convray.service.explaining import Explainer
from convray.service.frontends import STOP_SIGNALS, FrontendMember, bind_failures
from convray.service.health import HealthServicer
from convray.service.inference import Classifier
from convray.service.metrics import Metrics
from convray.service.oip_servicer import InferenceServicer
from convray.service.ray_watch import RayGate, RayWatchdog
from convray.service.registry import ModelRegistry
from convray.service.rest import RestFrontEnd
from convray.service.rpc import (
    REST_API_LABEL,
    MalformedMessageGuard,
    OpenStreams,
    RequestSizes,
    ServiceTable,
)
from convray.service.security import (
    BearerToken,
    BearerTokenInterceptor,
    read_token,
    rest_ssl_context,
    server_credentials,
)
from convray.service.servicer import ClassifierServicer
from convray.v1 import classifier_pb2, classifier_pb2_grpc
from convray.workers import cluster
from convray.workers.repository import ModelRepository

log = logging.getLogger(__name__)
T = TypeVar("T")
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
OIP_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
READINESS_SERVICES = ("", CLASSIFIER_SERVICE, OIP_SERVICE)
LIVENESS_SERVICE = "liveness"  # SERVING while the process runs and is not shutting down
# Why RepositoryModelLoad/Unload are refused in a group: each front end has its own registry.
MODEL_CONTROL_OFF = (
    "this server runs {count} front-end processes (--frontends) and a load or unload would change only the one "
    "this call reached; put the version in the repository and let --poll-interval-s serve it on all of them"
)
# Why they are refused by default: as Triton's default (--model-control-mode=none), for a server that may be reachable
# by clients who should classify, not change what is served.
MODEL_CONTROL_DISABLED = (
    "model control is off: start the server with --model-control (CONVRAY_MODELS__CONTROL=true) to load and unload "
    "models by request, or put new versions in the repository for --poll-interval-s to serve"
)
REPLICA_CHECK_TIMEOUT_S = 10.0  # after Ray answers again, how long the replicas get to answer too
MAX_PENDING_CALLS = 20_000  # calls received and not yet handled past which grpc core cancels new ones
DRAIN_BATCHES_AT_LEAST_S = 1.0  # at the end of a drain, for the batches of calls already answered to come back


def model_control_refusal(settings: Settings, member: FrontendMember | None) -> str | None:
    """Why this server refuses RepositoryModelLoad/Unload (FAILED_PRECONDITION), or None where it allows them."""
    if member is not None:
        return MODEL_CONTROL_OFF.format(count=member.count)
    return None if settings.models.control else MODEL_CONTROL_DISABLED


def _in_thread(
    loop: asyncio.AbstractEventLoop, function: Callable[..., T], *args: Any, keep_alive: bool = False
) -> asyncio.Future[T]:
    """Run a blocking call in a daemon thread of its own, so a call that never returns cannot block exit.

    With ``keep_alive`` the thread then stays alive until the process exits: Ray starts its GCS and
    raylet with PR_SET_PDEATHSIG, which kills them when the *thread* that spawned them ends.
    """
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(*args), None)
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting coroutine)
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:  # the loop closed meanwhile (the server stopped): nobody is waiting
            pass
        if keep_alive:
            threading.Event().wait()  # keep Ray's child processes alive (see above)

    name = "convray-ray-connect" if keep_alive else "convray-ray-call"
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # the waiter gave up (timeout) and cancelled it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type] (result is a T whenever error is None)


def request_sizes(settings: Settings) -> RequestSizes:
    """The largest request each gRPC method takes (checked before it is parsed).

    OIP inference carries tensors of several images; the native API's Classify, ClassifyStream (each message) and
    Explain one image; the rest a few small fields.
    """
    classifier = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    inference = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    large = {f"/{inference.full_name}/{m}": inference.methods_by_name[m] for m in ("ModelInfer", "ModelStreamInfer")}
    one_image = {
        f"/{classifier.full_name}/{m}": classifier.methods_by_name[m] for m in ("Classify", "ClassifyStream", "Explain")
    }
    return RequestSizes(
        max_message_bytes=settings.server.max_message_bytes,
        max_image_bytes=settings.inputs.max_image_bytes,
        large=frozenset(large),
        one_image=frozenset(one_image),
        request_types={name: method.input_type for name, method in (large | one_image).items()},
    )


def grpc_server_options(server: ServerSettings, share_port: bool = False) -> list[tuple[str, int]]:
    """The grpc core options the server is built with; ``share_port`` for one of several front ends."""
    options = [
        ("grpc.max_receive_message_length", server.max_message_bytes),
        ("grpc.max_send_message_length", server.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default, so a second server on a port in use would bind too and
        # the kernel would split connections between the two; binding must fail instead, except among the
        # front ends of one `--frontends N`, which share the port on purpose (service/frontends.py).
        ("grpc.so_reuseport", int(share_port)),
        # Keepalive, both ways. The server pings a silent connection so a client that vanished without closing
        # (its node lost) does not hold a stream and its resources for grpc's default 2 hours, and so idle
        # connections stay open through load balancers that drop them (AWS NLB after 350 s). No cap on pings
        # without data, or the server would stop checking after two.
        ("grpc.keepalive_time_ms", _ms(server.keepalive_time_s)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_timeout_ms", _ms(server.keepalive_timeout_s)),
        # grpc 1.85's server waits this long for any ping's ack, keepalive ones included, whatever the option above
        # says (grpc's default: 60 s); tests/service/test_server_connections.py fails without it.
        ("grpc.http2.ping_timeout_ms", _ms(server.keepalive_timeout_s)),
        # Clients' own keepalive pings (tritonclient's KeepAliveOptions, grpc channel options) are accepted as
        # often as every min_client_ping_interval_s, with or without calls in flight. Under grpc's defaults
        # (5 minutes, none while idle) a client pinging every 10 s gets GOAWAY "too_many_pings", which also cuts
        # its open streams (tests/service/test_server_connections.py shows it).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(server.min_client_ping_interval_s)),
        # grpc core sheds calls that wait for the application to take them up: at random past 1,000 waiting, all
        # past 3,000, and their clients see CANCELLED, which clients take for their own doing and do not retry.
        # A burst reaches the handlers instead, where the queue bound (--max-queue) answers RESOURCE_EXHAUSTED
        # with when to retry; core's shedding stays, further out, as the last resort against a flood.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]
    if server.max_connection_age_s > 0:
        # A client keeps its one HTTP/2 connection, and so its front end, for as long as it lives: behind a
        # Kubernetes Service (connection-level balancing) front ends the HPA adds would get no traffic from
        # clients already connected. A GOAWAY after this long makes the client reconnect, through the balancer,
        # for its next calls. No grace period is set: calls in flight, and streams (tritonclient keeps one open
        # for as long as it streams), finish on the old connection however long they take.
        options.append(("grpc.max_connection_age_ms", _ms(server.max_connection_age_s)))
    return options


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def where_ray_is(workers: WorkerSettings, member: FrontendMember | None) -> tuple[str, str]:
    """How start-up errors name this server's Ray, and the flags behind it.

    A ``--frontends`` group's front ends join the Ray their supervisor started, at an address the user never
    gave: blaming ``--ray-address`` there would send them looking for a flag they did not use.
    """
    if member is not None and member.ray_embedded:
        return f"the Ray started for the group at {workers.ray_address}", "--ray-connect-timeout-s"
    if workers.ray_address:
        return workers.ray_address, "--ray-address, --ray-connect-timeout-s"
    return "an embedded local Ray", "--ray-connect-timeout-s"


class StartupError(Exception):
    """The server could not become ready (Ray unreachable, or no model could be loaded)."""


def _bind(
    server: grpc.aio.Server,
    address: str,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
    shared: bool = False,
) -> int:
    """Add a port at ``address`` to ``server`` (TLS with ``credentials``); the port bound.

    ``shared``: the port is shared on purpose with the other front ends of ``--frontends N`` (SO_REUSEPORT).

    Raises:
        StartupError: the bind failed, naming ``what``, on any of the addresses the host resolves to.
    """
    _refuse_if_taken(address, what, shared)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # what grpc raises when the bind fails
        port = 0
    if port == 0:
        raise StartupError(f"could not bind {what} to {address} (in use or not permitted)")
    return port


def _refuse_if_taken(address: str, what: str, shared: bool) -> None:
    """Raise if any address ``address``'s host resolves to has its port in use.

    grpc binds every address it can and only logs the rest ("Only 1 addresses added out of total 2
    resolved"): with another process on 127.0.0.1:PORT, ``localhost:PORT`` came up on [::1] alone, and
    clients dialling 127.0.0.1 reached the other process.

    Raises:
        StartupError: naming the address in use and ``what``.
    """
    host, _, port = address.rpartition(":")
    if port in ("", "0"):
        return  # an ephemeral port is always free
    try:
        failures = bind_failures(host, int(port), reuse_port=shared)
    except (OSError, ValueError):
        return  # grpc reports an address it cannot resolve itself
    for where, exc in failures:
        # Only a port someone else holds: an address this machine cannot use at all (::1 where IPv6 is off,
        # though /etc/hosts names it) grpc skips, as it always has, and serves on the others.
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise StartupError(
                f"could not bind {what} to {address}: {where} port {port} is in use or not permitted ({exc})"
            ) from None


class ConvrayServer:
    """One convray front end: gRPC server, metrics endpoint, model registry on Ray."""

    def __init__(self, settings: Settings, member: FrontendMember | None = None) -> None:
        """``member``: this server is one of ``--frontends N`` (service/frontends.py); None when it is alone."""
        self.settings = settings
        self.member = member
        self.metrics = Metrics(CollectorRegistry())
        self.registry = ModelRegistry(
            ModelRepository(settings.models.model_repo),
            settings.models.default_model,
            settings.batching,
            settings.workers,
            self.metrics,
        )
        self._decoder = ThreadPoolExecutor(settings.inputs.decode_threads, thread_name_prefix="convray-decode")
        classifier = Classifier(
            self.registry,
            settings.inputs.decode_limits(),
            settings.inputs.default_top_k,
            self._decoder,
            self.metrics,
        )
        self.health = HealthServicer()  # grpc's, with its Watch streams bounded
        security = settings.security
        token = None if security.auth_token_file is None else BearerToken(read_token(security.auth_token_file))
        # Before any wrapper of the handlers below: nothing is read or parsed for a caller without the token.
        interceptors = [] if token is None else [BearerTokenInterceptor(token)]
        self.ray_gate = RayGate(self.metrics, self.registry.metric_label)
        # Every method's handler, wrapped once: malformed requests refused before the Ray gate counts them.
        services = ServiceTable([MalformedMessageGuard(request_sizes(settings)).wrap, self.ray_gate.wrap])
        self.services = services
        self._credentials = server_credentials(security)
        self._server = grpc.aio.server(
            interceptors=interceptors, options=grpc_server_options(settings.server, share_port=member is not None)
        )
        explainer = Explainer(
            self.registry,
            settings.inputs.decode_limits(),
            settings.explain,
            settings.inputs.default_top_k,
            self._decoder,
        )
        self.open_streams = OpenStreams()
        model_control_off = model_control_refusal(settings, member)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                classifier,
                self.registry,
                self.metrics,
                settings.batching,
                settings.workers,
                model_control_off=model_control_off,
                streams=self.open_streams,
            ),
            services,
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(
                classifier, self.registry, self.metrics, explainer, settings.batching, self.open_streams
            ),
            services,
        )
        self._rest: RestFrontEnd | None = None
        if settings.server.http_port is not None:  # the same OIP servicer's work, counted as api="rest"
            rest_servicer = InferenceServicer(classifier, self.registry, self.metrics, settings.batching,
                                              settings.workers, model_control_off, api=REST_API_LABEL)  # fmt: skip
            self._rest = RestFrontEnd(
                rest_servicer,
                self.registry,
                self.ray_gate,
                token,
                settings.server.max_message_bytes,
                self._decoder,
            )
            self._rest_tls = rest_ssl_context(security)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        reflected = [
            CLASSIFIER_SERVICE,
            OIP_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        # What reflection.enable_server_reflection does, but into the table (it would register the method with grpc).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(reflected), services
        )
        services.install(self._server)
        # Health checks only, in plaintext, for probes that cannot do TLS: a server of its own, since a port added
        # to the main one would serve every API on it unencrypted. Same servicer, so both report the same status.
        self._health_server: grpc.aio.Server | None = None
        if settings.server.health_port is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(member is not None))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.port = 0
        self.health_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        self._bring_up: asyncio.Task[None] | None = None
        self.watchdog: RayWatchdog | None = None
        self._joining: asyncio.Future[str] | None = None  # the one Ray join under way, if any
        self._leaving: asyncio.Future[None] | None = None  # the one ray.shutdown under way, if any
        self._ray_lost_reason: str | None = None
        # Signal handlers serve() installed on the loop; put back after each join (_take_back_signal_handlers).
        self.signal_handlers: dict[int, Callable[[], object]] = {}

    async def start(self) -> None:
        """Open the ports and begin connecting to Ray and loading models in the background."""
        for doubt in self.settings.doubts():
            log.warning("%s", doubt)
        server = self.settings.server
        shared = self.member is not None
        self.port = _bind(self._server, f"{server.host}:{server.port}", "gRPC", self._credentials, shared)
        if self._health_server is not None:
            self.health_port = _bind(
                self._health_server, f"{server.host}:{server.health_port}", "the health port", shared=shared
            )
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self._rest is not None:
            address = f"{server.host}:{server.http_port}"
            _refuse_if_taken(address, "the REST port", shared)
            try:
                self.http_port = await self._rest.start(server.host, server.http_port, self._rest_tls, shared)
            except OSError as exc:
                raise StartupError(f"could not bind the REST port to {address}: {exc}") from exc
        if server.metrics_port is not None:
            try:
                self._metrics_http, _ = start_http_server(
                    server.metrics_port, addr=server.metrics_host, registry=self.metrics.registry
                )
            except OSError as exc:
                raise StartupError(
                    f"could not bind metrics to {server.metrics_host}:{server.metrics_port}: {exc}"
                ) from exc
            self.metrics_port = self._metrics_http.server_port
        self._bring_up = asyncio.create_task(self._connect_and_load())

    async def _connect_and_load(self) -> None:
        workers = self.settings.workers
        where, flags = where_ray_is(workers, self.member)
        try:
            gcs = await asyncio.wait_for(
                _in_thread(
                    asyncio.get_running_loop(),
                    cluster.connect,
                    workers.ray_address,
                    workers.ray_num_cpus,
                    keep_alive=True,
                ),
                workers.ray_connect_timeout_s,
            )
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            raise StartupError(
                f"could not connect to {where} within {workers.ray_connect_timeout_s:g} s ({flags})"
                + cluster.join_timeout_hint(workers.ray_address)
            ) from None
        except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable cluster)
            raise StartupError(f"could not connect to {where}: {exc}") from exc
        self._take_back_signal_handlers()
        self.metrics.ray_connected.set(1)  # joined (the gauge says so while the models load)
        import ray

        self.metrics.build.info(
            {
                "version": __version__,
                "ray": ray.__version__,
                "torch": importlib.metadata.version("torch"),  # as installed: the front end never imports it
                "grpcio": grpc.__version__,
                "python": platform.python_version(),
            }
        )
        errors = await self.registry.load_latest_of_each()
        if not self.registry.ready:
            raise StartupError("no model could be loaded: " + "; ".join(errors))
        self.registry.start_polling(self.settings.models.poll_interval_s)
        await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)
        self._start_watchdog()
        # Everything built so far (torch, Ray, grpc: ~220,000 objects) lives as long as the process. Frozen, it is
        # out of the cyclic collector's sight, and collections scan only what requests allocate: 3-5% less
        # front-end CPU per request at c=32 on `digits` (docs/benchmarks.md).
        gc.freeze()
        served = {name: self.registry.loaded_versions(name) for name in self.registry.repository.model_names()}
        metrics_at = (
            f"http://{self.settings.server.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off"
        )
        rest = "" if self.http_port is None else f", OIP REST on {self.settings.server.host}:{self.http_port}"
        log.info(
            "convray ready%s: gRPC on %s:%d%s, models %s, Ray at %s, metrics %s, event loop %s",
            "" if self.member is None else f" (front end {self.member.index + 1} of {self.member.count})",
            self.settings.server.host,
            self.port,
            rest,
            served,
            gcs,
            metrics_at,
            type(asyncio.get_running_loop()).__module__.partition(".")[0],  # uvloop or asyncio
        )

    async def _set_readiness(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in READINESS_SERVICES:
            await self.health.set(service, status)

    def _start_watchdog(self) -> None:
        workers = self.settings.workers
        if workers.ray_check_interval_s <= 0:
            return
        self.watchdog = RayWatchdog(
            probe=self._probe_ray,
            on_lost=self._ray_lost,
            recover=self._recover_ray,
            on_back=self._ray_back,
            interval_s=workers.ray_check_interval_s,
            lost_exit_s=workers.ray_lost_exit_s,
            rejoin_after_s=cluster.RAY_GCS_RECONNECT_TIMEOUT_S / 2,  # leave the old session before Ray kills it
            replaced=cluster.RayClusterReplaced,
        )
        self.watchdog.start()

    async def _probe_ray(self) -> None:
        timeout = self.settings.workers.ray_check_interval_s
        loop = asyncio.get_running_loop()
        # Off the event loop, in its own thread: a probe stuck in Ray must not hold up the next ones' timeouts.
        await asyncio.wait_for(_in_thread(loop, cluster.check_gcs, timeout), timeout + 1.0)

    async def _ray_lost(self, reason: str) -> None:
        self._ray_lost_reason = reason
        failed = self.ray_gate.close(reason)
        self.registry.ray_lost = True
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ray_connected.set(0)
        self.metrics.ray_lost.inc()
        workers = self.settings.workers
        log.error(
            "Ray cluster at %s lost (%s): readiness NOT_SERVING, requests answered UNAVAILABLE (%d in flight failed); "
            "recovering, or exiting with code 1 if not back within %s (--ray-lost-exit-s)",
            workers.ray_address or "an embedded local Ray",
            reason,
            failed,
            f"{workers.ray_lost_exit_s:g} s" if workers.ray_lost_exit_s else "ever",
        )

    async def _recover_ray(self, rejoin: bool) -> bool:
        """Serve again: check the replicas of the old session, or leave it, join anew and reload the models."""
        if not rejoin:
            if await self._replicas_answer():
                return True
            log.warning("Ray answers again but replicas do not; reloading the models")
            await self.registry.abandon_all(stop_replicas=True)  # same session: one only slow would live on
        else:
            workers = self.settings.workers
            loop = asyncio.get_running_loop()
            if self._joining is None:  # a join already under way is awaited again, never started twice
                if self._leaving is None and ray_is_connected():
                    await self.registry.abandon_all()
                    log.warning("leaving the lost Ray session to join again at %s", workers.ray_address or "local")
                    self._leaving = _in_thread(loop, cluster.disconnect)
                if self._leaving is not None:  # ray.shutdown may wait on a GCS that is gone: never twice at once
                    done, _ = await asyncio.wait({self._leaving}, timeout=workers.ray_check_interval_s * 5)
                    if not done:
                        return False
                    self._leaving = None
                self._joining = _in_thread(
                    loop, cluster.connect, workers.ray_address, workers.ray_num_cpus, keep_alive=True
                )
            try:
                await asyncio.wait_for(asyncio.shield(self._joining), workers.ray_connect_timeout_s)
            except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
                return False
            except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable cluster)
                log.warning("could not join Ray again yet: %s", exc)
                self._joining = None
                return False
            self._joining = None
            self._take_back_signal_handlers()
        if not self.registry.ready:
            errors = await self.registry.load_latest_of_each()
            if not self.registry.ready:
                log.warning("no model could be loaded again yet: %s", "; ".join(errors))
                return False
        return True

    def _take_back_signal_handlers(self) -> None:
        """Put serve()'s stop-signal handlers back after joining Ray, whose core worker installs its own.

        Ray's SIGTERM handler printed a stack dump ("*** SIGTERM received ...", at error level) on every
        ordinary stop before passing the signal on; after a rejoin, one also killed the process undrained.
        """
        loop = asyncio.get_running_loop()
        for sig, handler in self.signal_handlers.items():
            loop.add_signal_handler(sig, handler)

    async def _replicas_answer(self) -> bool:
        calls = [actor.describe.remote() for s in self.registry.served_versions() for actor in s.pool.actors]
        if not calls:  # none served: an earlier attempt abandoned the models, which must be loaded again
            return False
        try:
            await asyncio.wait_for(asyncio.gather(*calls), REPLICA_CHECK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 (dead, restarting or unreachable replicas)
            return False
        return True

    async def _ray_back(self, lost_for_s: float) -> None:
        self._ray_lost_reason = None
        self.registry.ray_lost = False
        self.ray_gate.open()
        self.metrics.ray_connected.set(1)
        await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)
        served = {name: self.registry.loaded_versions(name) for name in self.registry.repository.model_names()}
        log.info("Ray cluster back after %.1f s: serving again, models %s", lost_for_s, served)

    @property
    def ray_lost(self) -> bool:
        """Whether the Ray cluster is lost now (after start)."""
        return self._ray_lost_reason is not None

    async def wait_gave_up(self) -> None:
        """Return once the watchdog gave up on a lost Ray cluster (the process should exit 1)."""
        while self.watchdog is None:
            await asyncio.sleep(1.0)
        await self.watchdog.gave_up.wait()

    async def wait_ready(self) -> None:
        """Wait until the models are loaded.

        Raises:
            StartupError: Ray could not be reached or no model loaded.
        """
        assert self._bring_up is not None, "start() first"
        await asyncio.shield(self._bring_up)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health to NOT_SERVING, refuse new calls, finish admitted ones, stop replicas."""
        grace = self.settings.server.drain_grace_s if grace_s is None else grace_s
        drain_ends = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.open_streams.stop_reading()  # each ends after its replies, not at the end of the grace period
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
        if self.watchdog is not None:
            await self.watchdog.stop()
        rest_drained = None if self._rest is None else asyncio.ensure_future(self._rest.stop(grace))
        await self._server.stop(grace)
        if rest_drained is not None:
            await rest_drained
        if self._health_server is not None:  # answered NOT_SERVING through the drain; now nothing is served
            await self._health_server.stop(None)
        if self.ray_lost:
            await self.registry.abandon_all()  # nothing to drain: the replicas went with the cluster
        else:  # the calls were answered or cancelled by now; what their batches still hold gets a moment more
            await self.registry.close(timeout_s=max(drain_ends - time.monotonic(), DRAIN_BATCHES_AT_LEAST_S))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server has stopped."""
        await self._server.wait_for_termination()


async def serve(settings: Settings, member: FrontendMember | None = None) -> int:
    """Run a server until SIGINT or SIGTERM, then drain; returns the process exit code."""
    try:
        server = ConvrayServer(settings, member)
        await server.start()
    except (StartupError, OSError, ValueError) as exc:  # ports, TLS files, token file
        log.error("%s", exc)
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
        server.signal_handlers[sig] = stopping.set
    if member is not None:  # a group's front end blocked them as it started: one sent meanwhile arrives now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    health = "" if server.health_port is None else f", health checks only (plaintext) on port {server.health_port}"
    log.info(
        "gRPC listening on %s:%d%s; connecting to Ray and loading models", settings.server.host, server.port, health
    )
    stop_waiter = asyncio.create_task(stopping.wait())
    ready_waiter = asyncio.create_task(server.wait_ready())
    await asyncio.wait({stop_waiter, ready_waiter}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    gave_up = asyncio.create_task(server.wait_gave_up())
    if ready_waiter.done() and ready_waiter.exception() is not None:
        log.error("%s", ready_waiter.exception())
        exit_code = 1
    else:
        await asyncio.wait({stop_waiter, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        if gave_up.done():
            exit_code = 1
            log.error(
                "Ray cluster at %s still lost after %g s (--ray-lost-exit-s): exiting with code 1 to be restarted",
                settings.workers.ray_address or "an embedded local Ray",
                settings.workers.ray_lost_exit_s,
            )
        else:
            log.info("shutting down: draining for up to %.1f s", settings.server.drain_grace_s)
    ready_waiter.cancel()
    gave_up.cancel()
    await server.stop()
    if server.ray_lost:
        # Ray's shutdown, and its exit hooks, wait on a GCS that is gone (measured: 10 s and more); the
        # replicas went with the cluster, so there is nothing to stop. Leave now.
        log.info("stopped (Ray lost: leaving without Ray's shutdown)")
        logging.shutdown()
        os._exit(exit_code)
    if ray_is_connected():
        # Disconnect (and stop an embedded Ray) now, not in Ray's exit hooks, which can abort the
        # process while other threads are still running.
        import ray

        ray.shutdown()
    log.info("stopped")
    return exit_code


def ray_is_connected() -> bool:
    """Whether this process has a Ray connection (without importing ray when it was never used)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()
