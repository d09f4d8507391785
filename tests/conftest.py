"""Shared fixtures: the shipped model repository, a session-wide local Ray, and a real convray server."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import traceback
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "models"


def digit_png(pixels) -> bytes:
    """One uint8 (1, H, W) digit image encoded as PNG, as a client would send it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[0], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A writable copy of the shipped model repository."""
    target = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, target)
    return target


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, for fixtures that report more when a test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def ray_state_on_failure(request):
    """When the test fails (a pytest-timeout included), print what the shared Ray was doing: its actors and
    placement groups that are not done, its free resources, and the lines its workers logged during the test
    that name an error or a retry. A Tune search once hung for the whole timeout in CI with nothing to go on."""
    import time

    started = time.time()
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        # To the terminal, where it lands beside the test's F in the progress lines: CI shows only the start and
        # the end of a long output, and a captured section sits in the middle, after the traceback.
        plugins = request.config.pluginmanager
        terminal, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        text = _ray_state(started)
        if terminal is None or capture is None:
            print(text, file=sys.stderr)
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\n{request.node.nodeid}: {text}")


RAY_LOG_MARKERS = ("FailurePolicy", "Error", "Traceback", "WARNING", "Timeout", "timed out", "PENDING")


def _ray_state(since: float, max_lines: int = 60) -> str:
    import ray

    if not ray.is_initialized():
        return "ray_state_on_failure: Ray is not initialised"
    lines = [f"ray_state_on_failure: available {ray.available_resources()} of {ray.cluster_resources()}"]
    try:
        from ray._private import state

        for actor in state.actors().values():
            if actor.get("State") != "DEAD":
                lines.append(f"  actor {actor.get('ActorClassName')} {actor.get('State')} pid {actor.get('Pid')}")
        for group in ray.util.placement_group_table().values():
            if group.get("state") != "REMOVED":
                lines.append(f"  placement group {group.get('name')!r} {group.get('state')} {group.get('bundles')}")
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    except Exception as exc:  # noqa: BLE001 (a private API moved: say so, keep what was found)
        return "\n".join([*lines, f"  (could not read more: {exc!r})"])
    found = []
    for path in sorted(logs.glob("*.*"), key=lambda p: p.stat().st_mtime):
        if path.suffix not in (".err", ".out") or path.stat().st_mtime < since:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        found += [f"  {path.name}: {line}" for line in text if any(marker in line for marker in RAY_LOG_MARKERS)]
    return "\n".join([*lines, *found[-max_lines:]])


@pytest.fixture(scope="session")
def ray_address() -> str:
    """One local Ray for the whole test run (started on first use), shared by every server under test."""
    import ray

    from convray.workers import cluster

    address = cluster.connect(None, num_cpus=4)
    yield address
    ray.shutdown()


class ServerThread:
    """A real ConvrayServer on its own event loop in a background thread, bound to 127.0.0.1:0."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="convray-test-server", daemon=True)
        self.server = None

    def start(self, timeout_s: float = 180) -> ServerThread:
        from convray.service.server import ConvrayServer

        async def start() -> None:
            self.server = ConvrayServer(self.settings)
            await self.server.start()
            await self.server.wait_ready()

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout_s)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coroutine, timeout_s: float = 60):
        """Run a coroutine on the server's loop (to reach its internals) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 60) -> None:
        if self.server is not None:
            try:
                self.call(self.server.stop(grace_s=2), timeout_s)
            except TimeoutError as exc:
                raise TimeoutError(f"the server did not stop within {timeout_s} s\n{self.where_it_waits()}") from exc
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def where_it_waits(self) -> str:
        """The server thread's stack, and where each task on its loop waits (a hung stop says nothing else)."""
        frame = sys._current_frames().get(self.thread.ident)
        lines = ["server thread:\n", *traceback.format_stack(frame)] if frame is not None else []
        for task in list(asyncio.all_tasks(self.loop)):  # read from another thread: good enough for a report
            lines.append(f"task {task.get_name()}, awaiting:\n")
            awaited = task.get_coro()
            while awaited is not None:  # the chain of coroutines each awaits, outermost first
                frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
                if frame is not None:
                    lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
                awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        return "".join(lines)


def server_settings(model_repo: Path, **overrides):
    """Settings for a server under test: loopback, free ports, small replicas."""
    from convray.service.config import Settings

    groups = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1", "metrics_port": 0},
        "models": {"model_repo": model_repo, "control": True},  # tests load and unload (off by default)
        "workers": {"replicas": 2, "cpus_per_replica": 0.5},
        "batching": {"max_batch_size": 32, "max_batch_delay_ms": 2.0},
    }
    for key, value in overrides.items():
        group, field = key.split("__")
        groups.setdefault(group, {})[field] = value
    return Settings(**groups)


@pytest.fixture(scope="session")
def served(ray_address, tmp_path_factory) -> ServerThread:
    """The shared server under test, serving a copy of the shipped model repository."""
    repo = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    server = ServerThread(server_settings(repo, server__http_port=0)).start()  # REST on too, for bench --api rest
    yield server
    server.stop()


@pytest.fixture(scope="session")
def channel(served) -> grpc.Channel:
    with grpc.insecure_channel(served.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from convray.v1 import classifier_pb2_grpc

    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="session")
def metered(ray_address, tmp_path_factory) -> ServerThread:
    """A server for the metrics tests: batches wait 300 ms (even when idle) and the queue holds 8 images,
    so a batch of 8 forms as one, and anything sent while it waits is refused for overload."""
    repo = tmp_path_factory.mktemp("metered") / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    settings = server_settings(repo, batching__max_batch_delay_ms=300.0, batching__max_queue=8,
                               batching__dispatch_when_idle=False)  # fmt: skip
    server = ServerThread(settings).start()
    yield server
    server.stop()
