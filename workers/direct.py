"""A replica's ``run`` over a plain socket connection: the cheapest way for a batch to cross into a replica.

Ray stays the control plane (it places, starts, restarts and kills replicas, and carries their
explain calls), but batches need not pay for a Ray task each: a plain async actor call costs about
1.4 ms and 0.9 ms of the caller's CPU here, a Compiled Graph keeps a core spinning, while a round trip
over a loopback TCP connection costs tens of microseconds (docs/benchmarks.md, scripts/bench_ray_hop.py).
So each replica opens a ``DirectListener`` when the pool asks it to (through a Ray call, which also
carries the secret token that every connection must present first), and the front end sends batches
through a ``DirectChannel``: one connection per batch in flight, each carrying one request and then
its reply at a time.

On Linux a listener also listens on a Unix socket in the abstract namespace (no file; reachable only from the
same network namespace: the same pod, or the same host outside containers). A channel tries it first and falls
back to TCP: a replica on another node or in another pod has no such socket in its namespace. The frames are the
same, and the kernel skips the TCP/IP stack: an idle round trip took 0.075 ms and 41 us of the caller's CPU,
against 0.133 ms and 71 us over loopback TCP (scripts/bench_ray_hop.py, docs/benchmarks.md).

The frames, all little-endian:

- connect: the client sends the 32-byte token; the listener answers one byte ``1``, or closes.
- request: ``4 x u32`` batch shape (N, C, H, W), then N*C*H*W uint8 pixels.
- reply: ``u8`` status. 0: ``f64`` compute seconds, ``u64`` GPU bytes allocated, ``u64`` reserved,
  ``2 x u32`` (rows, classes), then rows*classes float32 probabilities. 1: ``u32`` length, then the
  UTF-8 text of the error ``run`` raised (the connection stays usable).

A replica that dies closes its sockets, so calls in flight fail at once (``ReplicaUnreachable``); TCP
keep-alive catches a peer that vanished without closing (its node lost).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import io
import logging
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convray.workers.replica import ReplicaReply

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
MAX_HANDSHAKING = 64
"""Connections a listener holds before they have shown the token; past it new ones are closed at once, so a
flood of connections that never authenticate costs a bounded number of threads (each is dropped after the
handshake timeout). The front end's open connections are not counted, but a new one it opens during a flood is
refused too: the pool then sends that replica's batches by plain Ray calls until the channel opens again."""
JOIN_WRITES_UP_TO = 64 * 1024
"""Batches up to this many bytes of pixels are sent with their header in one write (one system call, one packet,
one wake-up of the replica); larger ones in two, so that their pixels are not copied."""
_SHAPE = struct.Struct("<4I")
_STATUS = struct.Struct("<B")
_OK_HEAD = struct.Struct("<dQQ2I")
_ERROR_HEAD = struct.Struct("<I")
_OK, _ERROR = 0, 1
_ACCEPTED = b"\x01"
LOCAL_SOCKETS = sys.platform == "linux"
"""Whether listeners here also listen on an abstract-namespace Unix socket (Linux has that namespace)."""
# TCP keep-alive: a peer gone without closing (its node lost) is noticed after about 5 + 3 x 2 s idle.
_KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}


@dataclass(frozen=True)
class DirectAddress:
    """Where a replica's ``DirectListener`` listens: TCP ``host``:``port``, and its local Unix socket if it has one.

    ``local`` is an abstract-namespace name (starting with a NUL byte), reachable only from the same network
    namespace; None where the platform has none.
    """

    host: str
    port: int
    local: str | None = None


class ReplicaUnreachable(ConnectionError):
    """The connection to a replica failed or closed: its process is gone (or restarting); retry elsewhere."""


class ReplicaError(RuntimeError):
    """``run`` raised inside the replica (a bad batch); the message is the replica's."""


def new_token() -> bytes:
    """A secret for one pool's connections, handed to its replicas through Ray."""
    return secrets.token_bytes(TOKEN_BYTES)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE.items():
        if hasattr(socket, option):  # Linux; macOS lacks some (the defaults then apply)
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class DirectListener:
    """Inside a replica: accepts the front end's connections and answers each batch with ``run``.

    A thread accepts; each connection gets its own thread (the front end opens one per batch in flight,
    a handful). ``run`` must be safe to call from several threads (``ModelRunner`` locks its model).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], ReplicaReply],
        token: bytes,
        host: str,
        max_batch_bytes: int,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        buffer: Callable[[tuple[int, ...]], np.ndarray] | None = None,
        max_handshaking: int = MAX_HANDSHAKING,
    ) -> None:
        """Listen on ``host`` (an ephemeral port); batches over ``max_batch_bytes`` close their connection.

        A connection that has not sent the token within ``handshake_timeout_s`` is closed, and one arriving while
        ``max_handshaking`` others have not yet sent theirs is closed at once. ``buffer(shape)``
        gives the uint8 array each batch is read into (``replica.batch_buffer``: pinned memory for a GPU).
        """
        self._run, self._token, self._max_batch_bytes = run, token, max_batch_bytes
        self._buffer = buffer or functools.partial(np.empty, dtype=np.uint8)
        self._handshake_timeout_s = handshake_timeout_s
        self._max_handshaking = max_handshaking
        self._handshake_slots = threading.BoundedSemaphore(max_handshaking)
        self._refusing = False  # the last connection was refused for want of a handshake slot
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6-only cluster's node IP
        self._socket = socket.create_server((host, 0), family=family)
        self.address: tuple[str, int] = (host, self._socket.getsockname()[1])
        self._local: socket.socket | None = None
        if LOCAL_SOCKETS:
            self._local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._local.bind(f"\0convray-direct-{os.getpid()}-{secrets.token_hex(8)}")
            self._local.listen()
        self._closed = False
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, args=(self._socket,), name="convray-direct-accept", daemon=True).start()
        if self._local is not None:
            threading.Thread(
                target=self._accept, args=(self._local,), name="convray-direct-accept-local", daemon=True
            ).start()

    @property
    def direct_address(self) -> DirectAddress:
        """Everything a ``DirectChannel`` needs to reach this listener, the local socket included."""
        local = self._local.getsockname().decode() if self._local is not None else None
        return DirectAddress(*self.address, local)

    def close(self) -> None:
        """Stop accepting and end every open connection (calls in flight on them fail at once)."""
        self._closed = True
        for listening in (self._socket, self._local):
            if listening is None:
                continue
            try:
                listening.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept(); close() alone does not on Linux
            except OSError:
                pass
            listening.close()
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its client

    def _accept(self, listening: socket.socket) -> None:
        while not self._closed:
            try:
                connection, _ = listening.accept()
            except OSError:
                return  # closed
            if self._closed:  # accepted as close() ran: it would escape close()'s shutdown of the connections
                connection.close()
                return
            if not self._handshake_slots.acquire(blocking=False):
                if not self._refusing:  # once per flood, not once per connection
                    log.warning("direct channel: refusing connections while %d others have not shown the token",
                                self._max_handshaking)  # fmt: skip
                self._refusing = True
                connection.close()
                continue
            self._refusing = False
            try:
                if listening is self._socket:  # TCP options; the local socket has none of them
                    _tune(connection)
                threading.Thread(target=self._serve, args=(connection,), name="convray-direct", daemon=True).start()
            except Exception:  # e.g. no thread can start now: refuse this one, keep accepting
                log.exception("direct channel: could not serve a connection")
                self._handshake_slots.release()
                connection.close()

    def _serve(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)
        try:
            with connection:
                try:
                    token = _read_within(connection, TOKEN_BYTES, self._handshake_timeout_s)
                finally:
                    self._handshake_slots.release()
                if not hmac.compare_digest(token, self._token):
                    log.warning("direct channel: refused a connection with a wrong token")
                    return
                self._answer(connection)
        except OSError:
            pass  # the front end went away (closed, reset); its batches in flight were already given up
        except Exception:  # its batches fail over as for a lost replica; the others' connections go on
            log.exception("direct channel: a connection failed")
        finally:
            with self._lock:
                self._connections.discard(connection)

    def _answer(self, connection: socket.socket) -> None:
        """Serve an authenticated connection's batches until it closes."""
        with connection.makefile("rb") as incoming:
            connection.settimeout(None)  # between batches a connection may idle for as long as traffic stops
            connection.sendall(_ACCEPTED)
            while (head := incoming.read(_SHAPE.size)) and len(head) == _SHAPE.size:
                shape = _SHAPE.unpack(head)
                size = shape[0] * shape[1] * shape[2] * shape[3]
                if size > self._max_batch_bytes:
                    log.warning("direct channel: refused a batch of %d bytes (limit %d)", size, self._max_batch_bytes)
                    return
                try:
                    pixels = self._buffer(shape)
                except Exception as exc:  # noqa: BLE001 (e.g. pinned memory exhausted: this batch fails, not the link)
                    if not _skip(incoming, size):
                        return  # the client went away mid-batch
                    connection.sendall(_error_reply(exc))
                    continue
                if incoming.readinto(memoryview(pixels).cast("B")) != size:
                    return  # the client went away mid-batch
                try:
                    reply = _encode_reply(self._run(pixels))
                except Exception as exc:  # noqa: BLE001 (the batch's error goes back to its caller)
                    reply = _error_reply(exc)
                connection.sendall(reply)


def _read_within(connection: socket.socket, size: int, timeout_s: float) -> bytes:
    """Up to ``size`` bytes, all within ``timeout_s``; fewer if the peer closed or the time ran out.

    The time is for all of them, not per read, so a peer that sends its token a byte at a time (or never)
    holds the connection's thread no longer than ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    received = b""
    while len(received) < size and (remaining := deadline - time.monotonic()) > 0:
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(size - len(received))
        except TimeoutError:
            break
        if not chunk:
            break
        received += chunk
    return received


def _skip(incoming: io.BufferedReader, size: int) -> bool:
    """Read and drop ``size`` bytes of a batch that has nowhere to go; False if the stream ended first."""
    while size > 0:
        chunk = incoming.read(min(size, 1 << 20))
        if not chunk:
            return False
        size -= len(chunk)
    return True


def _error_reply(exc: Exception) -> bytes:
    message = f"{type(exc).__name__}: {exc}".encode()
    return _STATUS.pack(_ERROR) + _ERROR_HEAD.pack(len(message)) + message


def _encode_reply(reply: ReplicaReply) -> bytes:
    probabilities = np.ascontiguousarray(reply.probabilities, dtype=np.float32)
    rows, classes = probabilities.shape
    head = _OK_HEAD.pack(
        reply.compute_s, reply.gpu_memory_allocated_bytes, reply.gpu_memory_reserved_bytes, rows, classes
    )
    return _STATUS.pack(_OK) + head + probabilities.tobytes()


class DirectChannel:
    """In the front end: ``await channel(pixels)`` runs one batch on the replica behind ``address``.

    Keeps idle connections for reuse and opens another when every open one is busy, so batches in
    flight each have their own. Connects over the replica's local Unix socket while that is reachable (the
    replica runs in this network namespace), else over TCP. Only the event loop that calls it may use it.
    """

    def __init__(self, address: DirectAddress | tuple[str, int], token: bytes) -> None:
        """``address``: a listener's ``direct_address``, or a bare (host, port) for TCP alone."""
        if not isinstance(address, DirectAddress):
            address = DirectAddress(*address)
        self.address, self._token = (address.host, address.port), token
        self._local = address.local  # None once it turned out unreachable from here: TCP from then on
        self._idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = collections.deque()
        self._broken = False

    @property
    def local(self) -> bool:
        """Whether new connections go over the replica's local Unix socket rather than TCP."""
        return self._local is not None

    @property
    def broken(self) -> bool:
        """True once a call lost its connection; the channel is then never used again."""
        return self._broken

    async def __call__(self, pixels: np.ndarray) -> ReplicaReply:
        """The replica's ``run(pixels)`` reply for a uint8 batch (N, C, H, W).

        Raises:
            ReplicaError: ``run`` raised (a bad batch); the channel stays usable.
            ReplicaUnreachable: the replica is gone, or refused the connection; retry elsewhere.
        """
        if self._broken:
            raise ReplicaUnreachable(f"direct channel to {self._where} is closed")
        if pixels.dtype != np.uint8 or pixels.ndim != 4:  # the header counts bytes as pixels: anything else desyncs
            raise TypeError(f"a batch is uint8 (N, C, H, W), got {pixels.dtype} {pixels.shape}")
        connection = self._idle.pop() if self._idle else await self._connect()
        reader, writer = connection
        try:
            header, pixels = _SHAPE.pack(*pixels.shape), np.ascontiguousarray(pixels)
            if pixels.nbytes <= JOIN_WRITES_UP_TO:  # one send: a system call costs more than copying a small batch
                writer.write(header + pixels.tobytes())
            else:
                writer.write(header)
                writer.write(memoryview(pixels).cast("B"))
            (status,) = _STATUS.unpack(await reader.readexactly(_STATUS.size))
            if status == _OK:
                compute_s, allocated, reserved, rows, classes = _OK_HEAD.unpack(await reader.readexactly(_OK_HEAD.size))
                body = await reader.readexactly(rows * classes * 4)
                reply: ReplicaReply | ReplicaError = ReplicaReply(
                    np.frombuffer(body, dtype=np.float32).reshape(rows, classes),  # read-only, like Ray's
                    compute_s,
                    allocated,
                    reserved,
                )
            else:
                (length,) = _ERROR_HEAD.unpack(await reader.readexactly(_ERROR_HEAD.size))
                reply = ReplicaError((await reader.readexactly(length)).decode(errors="replace"))
        except BaseException as exc:  # also when cancelled mid-call: the next bytes would be this reply
            writer.close()
            if isinstance(exc, OSError | asyncio.IncompleteReadError):
                raise self._fail(exc) from exc
            raise
        if self._broken:  # another call found the replica gone meanwhile: do not keep this connection
            writer.close()
        else:
            self._idle.append(connection)
        if isinstance(reply, ReplicaError):
            raise reply
        return reply

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # A replica that accepts nothing (its listener gone, the kernel still completing connections) must fail
        # the batch over, not hold it: connecting and the handshake get HANDSHAKE_TIMEOUT_S together.
        try:
            opened = await self._open_local() if self._local is not None else None
            if opened is None:
                opened = await asyncio.wait_for(asyncio.open_connection(*self.address), HANDSHAKE_TIMEOUT_S)
                _tune(opened[1].get_extra_info("socket"))
            reader, writer = opened
        except (OSError, asyncio.TimeoutError) as exc:  # noqa: UP041 (not yet the builtin on Python 3.10)
            raise self._fail(exc) from exc
        try:
            writer.write(self._token)
            answer = await asyncio.wait_for(reader.readexactly(len(_ACCEPTED)), HANDSHAKE_TIMEOUT_S)
            if answer != _ACCEPTED:
                raise ConnectionError("unexpected handshake answer")
        except BaseException as exc:
            writer.close()
            if isinstance(exc, OSError | asyncio.IncompleteReadError | asyncio.TimeoutError):
                raise self._fail(exc) from exc
            raise
        return reader, writer

    async def _open_local(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the replica's local Unix socket; None, and TCP from then on, if it is not reachable here.

        Through a socket of our own: uvloop cannot connect to an abstract name given as a path.
        """
        assert self._local is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self._local), HANDSHAKE_TIMEOUT_S)
            except OSError as exc:  # another network namespace (another node or pod), or the listener is gone
                log.info("direct channel to %s: its local socket is not reachable from here (%s); using TCP",
                         self._where, exc)  # fmt: skip
                self._local = None
                sock.close()
                return None
            return await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    @property
    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _fail(self, exc: BaseException) -> ReplicaUnreachable:
        if not self._broken:
            log.warning("direct channel to %s failed (%s: %s)", self._where, type(exc).__name__, exc)
        self.close()
        return ReplicaUnreachable(f"direct channel to {self._where} lost: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close every idle connection; calls in flight close theirs when they end."""
        self._broken = True
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
