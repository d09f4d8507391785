"""The real server's connections: how long a client keeps one, and keepalive pings in both directions."""

import shutil
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convray.service.config import ServerSettings
from convray.service.server import grpc_server_options
from convray.v1 import classifier_pb2 as pb
from convray.v1 import classifier_pb2_grpc
from convray.workers.data import load_digits_split
from tests.conftest import SHIPPED_MODELS, ServerThread, server_settings
from tests.service.test_server import encode_digit

pytestmark = pytest.mark.integration

# What a tritonclient user who turns keepalive on sends: a ping every 200 ms, with or without calls.
EAGER_PINGING_CLIENT = [
    ("grpc.keepalive_time_ms", 200),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@pytest.fixture(scope="module")
def image() -> bytes:
    _, data = load_digits_split()
    return encode_digit(data.images[0], "PNG")


def start_server(tmp_path, **overrides) -> ServerThread:
    repo = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, repo)
    return ServerThread(server_settings(repo, server__metrics_port=None, workers__replicas=1, **overrides)).start()


def test_grpc_options_ask_clients_to_reconnect_only_when_a_connection_age_is_set():
    assert not any("max_connection_age" in name for name, _ in grpc_server_options(ServerSettings()))
    options = dict(grpc_server_options(ServerSettings(max_connection_age_s=120)))
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert "grpc.max_connection_age_grace_ms" not in options  # streams may outlive the connection's age
    assert options["grpc.so_reuseport"] == 0


def test_grpc_options_carry_the_keepalive_settings():
    options = dict(grpc_server_options(ServerSettings(keepalive_time_s=30, keepalive_timeout_s=5)))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 5_000
    assert options["grpc.http2.max_pings_without_data"] == 0  # keeps checking a silent peer past two pings
    defaults = dict(grpc_server_options(ServerSettings()))
    assert defaults["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert defaults["grpc.keepalive_permit_without_calls"] == 1  # idle clients may ping too


def test_a_connection_past_its_age_is_replaced_and_no_call_fails(ray_address, tmp_path, image):
    server = start_server(tmp_path, server__max_connection_age_s=0.5)
    states = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            channel.subscribe(states.append, try_to_connect=True)
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            sent, until = [], time.monotonic() + 3.0
            while time.monotonic() < until:  # calls four at a time, over several connection ages
                batch = [stub.Classify.future(pb.ClassifyRequest(image=image), timeout=30) for _ in range(4)]
                sent += batch
                batch[-1].result()
            replies = [f.result() for f in sent]  # raises if any call failed
            assert len(replies) > 40 and all(r.predictions for r in replies)
            # Each GOAWAY takes the channel out of READY; it connects again for the next call.
            assert states.count(grpc.ChannelConnectivity.READY) >= 3, states

            def slow_stream():  # one item every 0.2 s for 2 s: four connection ages
                for i in range(10):
                    time.sleep(0.2)
                    yield pb.ClassifyRequest(image=image, request_id=f"s{i}")

            streamed = list(stub.ClassifyStream(slow_stream(), timeout=30))  # no grace period cuts it short
            assert [r.request_id for r in streamed] == [f"s{i}" for i in range(10)]
            assert all(r.WhichOneof("outcome") == "result" for r in streamed)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "min_client_ping_interval_s,accepted",
    [(0.1, True), (300.0, False)],  # 300 s is grpc's own default, which convray does not keep
    ids=["pings-allowed", "grpc-default-policy"],
)
def test_a_client_that_pings_often_keeps_its_stream_when_its_pings_are_allowed(
    ray_address, tmp_path, image, min_client_ping_interval_s, accepted
):
    server = start_server(tmp_path, server__min_client_ping_interval_s=min_client_ping_interval_s)
    try:
        with grpc.insecure_channel(server.address, options=EAGER_PINGING_CLIENT) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)

            def stream_with_a_pause():  # an item, 5 s of silence with only pings, another item
                yield pb.ClassifyRequest(image=image, request_id="before")
                time.sleep(5)
                yield pb.ClassifyRequest(image=image, request_id="after")

            replies = stub.ClassifyStream(stream_with_a_pause(), timeout=30)
            if accepted:
                assert [r.request_id for r in replies] == ["before", "after"]
            else:  # the failure the setting exists to prevent
                with pytest.raises(grpc.RpcError) as failure:
                    list(replies)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "too many pings" in failure.value.details().lower()
    finally:
        server.stop()


class SilenceableProxy:
    """A one-connection TCP proxy on loopback that can fall silent, like a client whose machine vanished.

    Silent, it forwards nothing either way and drops what the server sends (its pings included), but
    keeps both sockets open: the server sees no FIN or RST, only silence.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.silent = threading.Event()
        self.server_closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(self._upstream)
        self._sockets += [client, server]
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        self._pump(server, client, True)

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent.is_set():
                    target.sendall(data)
        except OSError:
            return
        if from_server:
            self.server_closed.set()

    def close(self) -> None:
        for sock in [self._listener, *self._sockets]:
            sock.close()


@pytest.mark.parametrize(
    "keepalive_time_s,dropped",
    [(0.3, True), (3600.0, False)],
    ids=["pinged", "not-pinged-for-an-hour"],
)
def test_the_server_closes_the_connection_of_a_client_that_fell_silent(
    ray_address, tmp_path, image, keepalive_time_s, dropped
):
    server = start_server(tmp_path, server__keepalive_time_s=keepalive_time_s, server__keepalive_timeout_s=0.3)
    proxy = SilenceableProxy(server.address)
    pause = threading.Event()
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)

            def stream_then_wait():  # one item, then the stream stays open until the test ends
                yield pb.ClassifyRequest(image=image, request_id="first")
                pause.wait(30)

            replies = stub.ClassifyStream(stream_then_wait(), timeout=30)
            assert next(replies).request_id == "first"
            # Let the pings that went with the reply (gRPC's flow-control probes) be answered first: any ping
            # the proxy drops would close the connection after keepalive_timeout_s, pinged or not.
            time.sleep(0.5)
            proxy.silent.set()
            # A pinged server notices within keepalive_time_s + keepalive_timeout_s; allow for a slow machine.
            assert proxy.server_closed.wait(5) is dropped
    finally:
        pause.set()
        proxy.close()
        server.stop()


def test_a_stream_past_the_servers_limit_of_open_streams_is_refused_resource_exhausted(
    ray_address, tmp_path, image, monkeypatch
):
    """Found in review: 20,000 idle streams, or health Watch streams, were all held open; past its limits the
    server now refuses new ones."""
    monkeypatch.setattr("convray.service.rpc.MAX_OPEN_STREAMS", 2)
    monkeypatch.setattr("convray.service.health.MAX_HEALTH_WATCHES", 2)
    server = start_server(tmp_path)
    silent = threading.Event()

    def one_then_silence():
        yield pb.ClassifyRequest(image=image, request_id="first")
        silent.wait(30)

    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            held = [stub.ClassifyStream(one_then_silence(), timeout=30) for _ in range(2)]
            assert [next(stream).request_id for stream in held] == ["first", "first"]  # both open, answered
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.ClassifyStream(one_then_silence(), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "has 2 request streams open, its limit" in refused.value.details()
            held[0].cancel()
            deadline = time.monotonic() + 10
            while True:  # the cancelled stream's place comes back once its handler has ended
                try:
                    assert next(stub.ClassifyStream(one_then_silence(), timeout=30)).request_id == "first"
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.1)

            health = health_pb2_grpc.HealthStub(channel)  # no token needed: probes cannot send one
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(2)]
            assert [next(watch).status for watch in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(service="other"), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "has 2 health Watch streams open, its limit; use Check" in refused.value.details()
            request = health_pb2.HealthCheckRequest(service="")
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING  # still
            for watch in watches:
                watch.cancel()
    finally:
        silent.set()
        server.stop()
