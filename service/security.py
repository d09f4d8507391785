"""TLS credentials and bearer-token authentication for the gRPC server."""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from convray.service.config import SecuritySettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Kubernetes' and load balancers' probes carry no credentials, so health checks stay open.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def rest_ssl_context(security: SecuritySettings) -> ssl.SSLContext | None:
    """The REST port's TLS (mutual when a client CA is set), from the gRPC port's files, or None for plaintext.

    Its own ``ServerCertificates``: each port notices a renewal for itself.
    """
    if security.tls_cert is None or security.tls_key is None:
        return None
    return ServerCertificates(security.tls_cert, security.tls_key, security.tls_client_ca).renewing_ssl_context()


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when a client CA is set) credentials, or None for plaintext.

    The files are read again when one of them changes (``ServerCertificates``), so a renewed certificate is served
    without a restart.
    """
    if security.tls_cert is None or security.tls_key is None:
        return None
    certificates = ServerCertificates(security.tls_cert, security.tls_key, security.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        certificates.configuration(),
        certificates.changed,
        require_client_authentication=security.tls_client_ca is not None,
    )


class ServerCertificates:
    """The server's certificate, key and client CA files, read again when one changes on disk.

    cert-manager and Kubernetes Secret volumes renew them in place (a Secret volume swaps a symlink); read once,
    a certificate expired under a server that had not restarted, and clients could no longer connect. gRPC asks
    ``changed`` at each new connection's handshake: a stat of each file, and a read only when one changed.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._seen = self._stamps()

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        stats = [path.stat() for path in (self._cert, self._key, self._client_ca) if path is not None]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now.

        Raises:
            OSError, ssl.SSLError: a file cannot be read, or the key does not belong to the certificate.
        """
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self._cert, self._key)  # a pair?
        return grpc.ssl_server_certificate_configuration(
            [(self._key.read_bytes(), self._cert.read_bytes())],
            root_certificates=self._client_ca.read_bytes() if self._client_ca else None,
        )

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if a file changed since it was last read, else None (gRPC keeps the current).

        Files caught mid-update (a key that does not match its certificate yet, a file missing) are not taken:
        the current ones serve on, and the next connection looks again.
        """
        return self._if_changed(self.configuration)

    def ssl_context(self) -> ssl.SSLContext:
        """The files as they are now, as the REST port's ``ssl.SSLContext`` (client certificates required with a CA).

        Raises:
            OSError, ssl.SSLError: a file cannot be read, or the key does not belong to the certificate.
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        if self._client_ca is not None:
            context.load_verify_locations(self._client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def renewing_ssl_context(self) -> ssl.SSLContext:
        """``ssl_context()``, which hands each new connection a context of the renewed files once one changed."""
        current = self.ssl_context()

        def renew(connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
            nonlocal current
            renewed = self._if_changed(self.ssl_context)
            if renewed is not None:
                renewed.sni_callback = renew
                current = renewed
            connection.context = current  # called at every handshake, with or without SNI

        current.sni_callback = renew
        return current

    def _if_changed(self, read: Callable[[], T]) -> T | None:
        try:
            stamps = self._stamps()
            if stamps == self._seen:
                return None
            configuration = read()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS files changed but cannot be used yet (%s); serving the previous certificate", exc)
            return None
        self._seen = stamps
        log.info("TLS files changed: new connections get the renewed certificate")
        return configuration


def read_token(path: Any) -> str:
    """The bearer token in ``path``, without surrounding whitespace.

    Raises:
        ValueError: the file is empty.
    """
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path}: the auth token file is empty")
    return token


class BearerToken:
    """The token a client must send as ``Bearer <token>``: gRPC metadata ``authorization``, HTTP ``Authorization``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def admits(self, given: str | bytes) -> bool:
        """Whether the header's value ``given`` carries the token, compared in constant time (no timing oracle).

        A string is encoded back with ``surrogateescape``, as aiohttp decoded a header's bytes that are not UTF-8:
        plain ``encode()`` raised on a header byte 0xFF (found in review of the REST port).
        """
        if isinstance(given, str):
            given = given.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self._expected)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks with UNAUTHENTICATED unless it carries the bearer token."""

    def __init__(self, token: BearerToken) -> None:
        self._token = token

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return self._token.admits(value)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised calls and health checks through; answer the rest UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES) or self._authorised(handler_call_details):
            return handler
        return _deny_handler(handler)


def _deny_handler(template: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request.

    Request-streaming whatever the method's kind: for a unary request grpc would first receive the whole message
    (up to --max-message-bytes) and the handler's own wrapper would parse it, so callers without the token could fill
    the server's memory with requests it refuses anyway (found in review: 16 of 60 MiB took it from 420 to
    1,555 MiB).
    """
    factory = (
        grpc.stream_stream_rpc_method_handler if template.response_streaming else grpc.stream_unary_rpc_method_handler
    )
    return factory(_deny, response_serializer=template.response_serializer)


async def _deny(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
    )
