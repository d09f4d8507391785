"""Build, start and drain the grpc.aio server: servicers, health, reflection, metrics endpoint.

The gRPC port opens at once, answering health checks with NOT_SERVING; Ray is connected and the
models are loaded in the background, then health flips to SERVING and one "ready" line is logged.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from convray.oip import inference_pb2, inference_pb2_grpc
from convray.service import __version__
from convray.service.codecs import DecodeLimits
from convray.service.config import Settings
from convray.service.explaining import Explainer
from convray.service.inference import Classifier
from convray.service.metrics import Metrics
from convray.service.oip_servicer import InferenceServicer
from convray.service.registry import ModelRegistry
from convray.service.rpc import MalformedMessageInterceptor
from convray.service.security import BearerTokenInterceptor, read_token, server_credentials
from convray.service.servicer import ClassifierServicer
from convray.v1 import classifier_pb2, classifier_pb2_grpc
from convray.workers import cluster
from convray.workers.repository import ModelRepository

log = logging.getLogger(__name__)
T = TypeVar("T")
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
OIP_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _in_daemon_thread(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a blocking call in a daemon thread, so a call that never returns cannot block exit.

    The thread then stays alive until the process exits: Ray starts its GCS and raylet with
    PR_SET_PDEATHSIG, which kills them when the *thread* that spawned them ends.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting coroutine)
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)
        threading.Event().wait()  # keep Ray's child processes alive (see above)

    threading.Thread(target=run, name="convray-ray-connect", daemon=True).start()
    return future


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # the waiter gave up (timeout) and cancelled it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type] (result is a T whenever error is None)


class StartupError(Exception):
    """The server could not become ready (Ray unreachable, or no model could be loaded)."""


class ConvrayServer:
    """One convray front end: gRPC server, metrics endpoint, model registry on Ray."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
            DecodeLimits(settings.inputs.max_image_bytes, settings.inputs.max_image_pixels),
            settings.inputs.default_top_k,
            self._decoder,
            self.metrics,
        )
        self.health = health.aio.HealthServicer()
        max_bytes = settings.server.max_message_bytes
        security = settings.security
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedMessageInterceptor()]
        if security.auth_token_file is not None:
            interceptors.append(BearerTokenInterceptor(read_token(security.auth_token_file)))
        self._credentials = server_credentials(security)
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
            ],
        )
        explainer = Explainer(
            self.registry,
            DecodeLimits(settings.inputs.max_image_bytes, settings.inputs.max_image_pixels),
            settings.explain,
            settings.inputs.default_top_k,
            self._decoder,
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(classifier, self.registry, self.metrics, explainer), self._server
        )
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(classifier, self.registry, self.metrics, settings.batching, settings.workers),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [
                CLASSIFIER_SERVICE,
                OIP_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        self._bring_up: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the ports and begin connecting to Ray and loading models in the background."""
        server = self.settings.server
        address = f"{server.host}:{server.port}"
        if self._credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, self._credentials)
        if self.port == 0:
            raise StartupError(f"could not bind gRPC to {server.host}:{server.port} (in use or not permitted)")
        for service in ("", CLASSIFIER_SERVICE, OIP_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
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
        where = workers.ray_address or "an embedded local Ray"
        try:
            gcs = await asyncio.wait_for(
                _in_daemon_thread(cluster.connect, workers.ray_address, workers.ray_num_cpus),
                workers.ray_connect_timeout_s,
            )
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            raise StartupError(
                f"could not connect to {where} within {workers.ray_connect_timeout_s:g} s "
                "(--ray-address, --ray-connect-timeout-s)"
            ) from None
        except Exception as exc:  # noqa: BLE001 (Ray raises several types for an unreachable cluster)
            raise StartupError(f"could not connect to {where}: {exc}") from exc
        import ray
        import torch

        self.metrics.build.info(
            {
                "version": __version__,
                "ray": ray.__version__,
                "torch": torch.__version__,
                "grpcio": grpc.__version__,
                "python": platform.python_version(),
            }
        )
        errors = await self.registry.load_latest_of_each()
        if not self.registry.ready:
            raise StartupError("no model could be loaded: " + "; ".join(errors))
        self.registry.start_polling(self.settings.models.poll_interval_s)
        for service in ("", CLASSIFIER_SERVICE, OIP_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        served = {name: self.registry.loaded_versions(name) for name in self.registry.repository.model_names()}
        metrics_at = (
            f"http://{self.settings.server.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else "off"
        )
        log.info(
            "convray ready: gRPC on %s:%d, models %s, Ray at %s, metrics %s",
            self.settings.server.host,
            self.port,
            served,
            gcs,
            metrics_at,
        )

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
        await self.health.enter_graceful_shutdown()
        if self._bring_up is not None and not self._bring_up.done():
            self._bring_up.cancel()
        await self._server.stop(grace)
        await self.registry.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server has stopped."""
        await self._server.wait_for_termination()


async def serve(settings: Settings) -> int:
    """Run a server until SIGINT or SIGTERM, then drain; returns the process exit code."""
    try:
        server = ConvrayServer(settings)
        await server.start()
    except (StartupError, OSError, ValueError) as exc:  # ports, TLS files, token file
        log.error("%s", exc)
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    log.info("gRPC listening on %s:%d; connecting to Ray and loading models", settings.server.host, server.port)
    stop_waiter = asyncio.create_task(stopping.wait())
    ready_waiter = asyncio.create_task(server.wait_ready())
    await asyncio.wait({stop_waiter, ready_waiter}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if ready_waiter.done() and ready_waiter.exception() is not None:
        log.error("%s", ready_waiter.exception())
        exit_code = 1
    else:
        await stop_waiter
        log.info("shutting down: draining for up to %.1f s", settings.server.drain_grace_s)
    ready_waiter.cancel()
    await server.stop()
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
