"""workers.direct: the socket fast path into a replica, with a real listener and real sockets in this process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from convray.workers.direct import (
    JOIN_WRITES_UP_TO,
    LOCAL_SOCKETS,
    DirectAddress,
    DirectChannel,
    DirectListener,
    ReplicaError,
    ReplicaUnreachable,
    new_token,
)
from convray.workers.replica import ModelRunner, ReplicaReply


class Recorder:
    """A stand-in for ModelRunner.run: answers each image with its mean pixel, remembering the batches."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.threads: set[int] = set()

    def __call__(self, pixels: np.ndarray) -> ReplicaReply:
        self.batches.append(pixels.copy())
        self.threads.add(threading.get_ident())
        if pixels.shape[1:] != (1, 8, 8):
            raise ValueError(f"batch must be uint8 (N, 1, 8, 8), got {pixels.dtype} {tuple(pixels.shape)}")
        means = pixels.reshape(len(pixels), -1).mean(axis=1, dtype=np.float32)
        return ReplicaReply(np.stack([means, -means], axis=1), 0.25, 1024, 2048)


@pytest.fixture
def listener():
    recorder = Recorder()
    token = new_token()
    listener = DirectListener(recorder, token, "127.0.0.1", max_batch_bytes=64 * 64)
    yield listener, recorder, token
    listener.close()


def images(*values: int) -> np.ndarray:
    return np.stack([np.full((1, 8, 8), v, dtype=np.uint8) for v in values])


async def test_a_batch_crosses_whole_and_its_reply_comes_back_with_the_replicas_measurements(listener):
    server, recorder, token = listener
    channel = DirectChannel(server.address, token)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)

    reply = await channel(pixels)

    np.testing.assert_array_equal(recorder.batches[0], pixels)
    expected = pixels.reshape(3, -1).mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(reply.probabilities, np.stack([expected, -expected], axis=1))
    assert (reply.compute_s, reply.gpu_memory_allocated_bytes, reply.gpu_memory_reserved_bytes) == (0.25, 1024, 2048)
    channel.close()


async def test_batches_either_side_of_the_one_write_size_cross_whole_one_after_another_on_one_connection():
    """Small batches go with their header in one write, large ones in two: both arrive intact and in step."""
    received = []

    def sums(pixels: np.ndarray) -> ReplicaReply:
        received.append(pixels.copy())
        totals = pixels.reshape(len(pixels), -1).sum(axis=1, dtype=np.float32)
        return ReplicaReply(totals[:, None], 0.0, 0, 0)

    token = new_token()
    server = DirectListener(sums, token, "127.0.0.1", max_batch_bytes=4 * JOIN_WRITES_UP_TO)
    channel = DirectChannel(server.address, token)
    rng = np.random.default_rng(1)
    side = 64  # one 3x64x64 image is 12 KiB: five images fit in one write, six do not
    batches = [rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8) for n in (1, 6, 5, 12, 1)]
    assert [b.nbytes <= JOIN_WRITES_UP_TO for b in batches] == [True, False, True, False, True]
    try:
        for pixels in batches:
            reply = await channel(pixels)
            np.testing.assert_array_equal(received[-1], pixels)
            np.testing.assert_array_equal(reply.probabilities[:, 0], pixels.reshape(len(pixels), -1).sum(axis=1))
        assert len(channel._idle) == 1  # every batch went over the one connection
    finally:
        channel.close()
        server.close()


async def test_concurrent_batches_each_get_their_own_connection_and_answer_and_connections_are_reused(listener):
    server, recorder, token = listener
    channel = DirectChannel(server.address, token)

    first = await asyncio.gather(*(channel(images(v, v)) for v in (10, 20, 30, 40)))
    again = await asyncio.gather(*(channel(images(v)) for v in (50, 60, 70, 80)))

    assert [r.probabilities[0, 0] for r in first + again] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert len(recorder.threads) == 4  # one connection (and replica thread) per batch in flight, then reused
    channel.close()


async def test_an_error_inside_the_replica_comes_back_with_its_message_and_the_channel_stays_usable(listener):
    server, _, token = listener
    channel = DirectChannel(server.address, token)

    with pytest.raises(ReplicaError, match=r"ValueError: batch must be uint8 \(N, 1, 8, 8\), got uint8 \(1, 3, 8, 8\)"):
        await channel(np.zeros((1, 3, 8, 8), dtype=np.uint8))

    assert not channel.broken
    assert (await channel(images(7))).probabilities[0, 0] == 7
    channel.close()


async def test_a_connection_without_the_token_is_refused_before_any_batch_runs(listener):
    server, recorder, _ = listener
    channel = DirectChannel(server.address, new_token())

    with pytest.raises(ReplicaUnreachable):
        await channel(images(1))

    assert channel.broken and recorder.batches == []
    with pytest.raises(ReplicaUnreachable, match="closed"):
        await channel(images(1))  # a broken channel fails fast, without connecting again


async def test_a_batch_over_the_size_limit_is_refused_unread(listener):
    server, recorder, token = listener
    channel = DirectChannel(server.address, token)

    with pytest.raises(ReplicaUnreachable):
        await channel(np.zeros((65, 1, 8, 8), dtype=np.uint8))  # 4,160 bytes against a limit of 4,096

    assert recorder.batches == []


async def test_a_replica_that_goes_away_fails_the_call_at_once_instead_of_hanging(listener):
    server, _, token = listener
    channel = DirectChannel(server.address, token)
    await channel(images(1))  # an open, idle connection
    server.close()  # ends its connections, as the replica's process dying would

    with pytest.raises(ReplicaUnreachable, match="lost"):
        await asyncio.wait_for(channel(images(2)), timeout=5)
    assert channel.broken


async def test_a_batch_with_no_buffer_to_land_in_fails_alone_and_the_connection_goes_on():
    """E.g. pinned memory exhausted for one large batch: that batch gets the error, the next one runs."""
    recorder, token = Recorder(), new_token()

    def buffer(shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] == 3:
            raise RuntimeError("pinned memory exhausted")
        return np.empty(shape, np.uint8)

    server = DirectListener(recorder, token, "127.0.0.1", max_batch_bytes=64 * 64, buffer=buffer)
    try:
        channel = DirectChannel(server.address, token)
        with pytest.raises(ReplicaError, match="RuntimeError: pinned memory exhausted"):
            await channel(images(1, 2, 3))
        reply = await channel(images(4, 5))
        assert reply.probabilities[:, 0].tolist() == [4.0, 5.0] and not channel.broken
        assert [len(b) for b in recorder.batches] == [2]
    finally:
        server.close()


def test_a_closed_listener_stops_accepting_and_its_thread_ends():
    def accept_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "convray-direct-accept"}

    before = accept_threads()
    server = DirectListener(Recorder(), new_token(), "127.0.0.1", max_batch_bytes=64)
    (its_thread,) = accept_threads() - before
    server.close()
    its_thread.join(timeout=2)
    assert not its_thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1).close()


async def test_a_replica_that_never_answers_the_handshake_is_unreachable_after_the_timeout(monkeypatch):
    import convray.workers.direct as direct

    monkeypatch.setattr(direct, "HANDSHAKE_TIMEOUT_S", 0.2)
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections; nobody answers
    try:
        channel = DirectChannel(silent.getsockname(), new_token())
        with pytest.raises(ReplicaUnreachable, match="lost: TimeoutError"):
            await asyncio.wait_for(channel(images(1)), 5)
        assert channel.broken
    finally:
        silent.close()


def test_nothing_listening_is_reported_as_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free once closed

    async def call() -> None:
        await DirectChannel(("127.0.0.1", port), new_token())(images(1))

    with pytest.raises(ReplicaUnreachable, match="lost"):
        asyncio.run(call())


async def test_a_model_runner_serves_the_same_probabilities_over_its_direct_channel(model_repo):
    runner = ModelRunner(str(model_repo), "digits", 1, device="cpu", threads=1)
    token = new_token()
    channel = DirectChannel(runner.open_direct_channel(token, host="127.0.0.1"), token)
    pixels = np.random.default_rng(1).integers(0, 17, (5, 1, 8, 8), dtype=np.uint8)

    reply = await channel(pixels)

    expected, _ = runner.predict(pixels)
    np.testing.assert_allclose(reply.probabilities, expected, atol=1e-6)
    assert channel.local == LOCAL_SOCKETS  # a front end on the replica's host goes over its local socket
    channel.close()


needs_local_sockets = pytest.mark.skipif(not LOCAL_SOCKETS, reason="abstract Unix sockets are Linux's")


@needs_local_sockets
async def test_a_channel_on_the_replicas_host_goes_over_its_local_socket_with_the_same_frames(listener):
    server, recorder, token = listener
    address = server.direct_address
    assert (address.host, address.port) == server.address and address.local.startswith("\0convray-direct-")
    channel = DirectChannel(address, token)
    pixels = np.random.default_rng(2).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)

    reply = await channel(pixels)

    np.testing.assert_array_equal(recorder.batches[0], pixels)
    assert reply.probabilities.shape == (4, 2) and reply.compute_s == 0.25
    assert channel.local
    channel.close()


@needs_local_sockets
async def test_a_local_socket_not_reachable_from_here_falls_back_to_tcp_for_good(listener):
    """A replica on another node (or in another pod) has no such socket in this network namespace."""
    server, _, token = listener
    elsewhere = DirectAddress(*server.address, local="\0convray-direct-on-another-node")
    channel = DirectChannel(elsewhere, token)

    assert (await channel(images(6))).probabilities[0, 0] == 6

    assert not channel.local  # the next connection goes straight to TCP
    channel.close()


@needs_local_sockets
async def test_the_local_socket_asks_for_the_token_too(listener):
    server, _, _ = listener
    with pytest.raises(ReplicaUnreachable, match="lost"):
        await DirectChannel(server.direct_address, new_token())(images(1))


@needs_local_sockets
def test_a_closed_listener_stops_accepting_on_its_local_socket_too():
    before = {t for t in threading.enumerate() if t.name == "convray-direct-accept-local"}
    server = DirectListener(Recorder(), new_token(), "127.0.0.1", max_batch_bytes=64)
    (its_thread,) = {t for t in threading.enumerate() if t.name == "convray-direct-accept-local"} - before
    local = server.direct_address.local
    server.close()
    its_thread.join(timeout=2)
    assert not its_thread.is_alive()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(local)


def test_a_peer_that_never_sends_its_token_is_dropped_after_the_handshake_timeout():
    server = DirectListener(Recorder(), new_token(), "127.0.0.1", max_batch_bytes=64, handshake_timeout_s=0.3)
    with socket.create_connection(server.address) as silent:
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the listener, not left holding its thread
    server.close()


def test_a_peer_that_trickles_its_token_is_dropped_after_the_handshake_timeout_not_per_byte():
    token = new_token()
    server = DirectListener(Recorder(), token, "127.0.0.1", max_batch_bytes=64, handshake_timeout_s=0.3)
    started = time.monotonic()
    with socket.create_connection(server.address) as trickling:
        trickling.settimeout(5)
        try:
            for byte in token:  # one byte every 0.1 s: each read is in time, the whole token is not
                trickling.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # dropped while still sending
        try:
            answer = trickling.recv(1)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # dropped, never accepted
    assert time.monotonic() - started < 2.0
    server.close()


async def test_connections_that_never_show_the_token_hold_a_bounded_number_of_threads():
    """Found in review: every connection got a thread until its handshake timed out, however many came."""
    token = new_token()
    server = DirectListener(Recorder(), token, "127.0.0.1", max_batch_bytes=64 * 64, max_handshaking=3)
    trusted = DirectChannel(server.address, token)
    assert (await trusted(images(5))).probabilities[0, 0] == 5  # its connection is open before the flood
    silent = [socket.create_connection(server.address) for _ in range(3)]
    try:
        time.sleep(0.2)  # all three accepted, each waiting for its token
        threads = threading.active_count()
        with socket.create_connection(server.address) as extra:
            extra.settimeout(5)
            assert extra.recv(1) == b""  # closed at once: no slot, no thread
        assert threading.active_count() == threads
        assert (await trusted(images(7))).probabilities[0, 0] == 7  # an authenticated connection is unaffected
        with pytest.raises(ReplicaUnreachable):
            await DirectChannel(server.address, token)(images(1))  # a new one waits for a slot like any other
    finally:
        for connection in silent:
            connection.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the listener sees the silent peers close and frees their slots
        try:
            fresh = DirectChannel(server.address, token)
            assert (await fresh(images(9))).probabilities[0, 0] == 9
            fresh.close()
            break
        except ReplicaUnreachable:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("slots were not freed when the silent peers closed")
    trusted.close()
    server.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_replica_on_an_ipv6_address_is_reached_the_same_way():
    token = new_token()
    server = DirectListener(Recorder(), token, "::1", max_batch_bytes=64 * 64)
    channel = DirectChannel(server.address, token)
    assert (await channel(images(9))).probabilities[0, 0] == 9
    channel.close()
    server.close()


async def test_a_batch_that_is_not_uint8_is_refused_before_it_can_desync_the_connection(listener):
    """The header counts pixels and the body is sent as bytes: a float batch would leave the next batch misread."""
    server, _, token = listener
    channel = DirectChannel(server.address, token)
    with pytest.raises(TypeError, match="a batch is uint8"):
        await channel(images(1).astype(np.float32))
    assert (await channel(images(4))).probabilities[0, 0] == 4  # the connection is still in step
    channel.close()
