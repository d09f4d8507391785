"""TLS credentials and bearer-token authentication for the gRPC server."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from convray.service.config import SecuritySettings

# Kubernetes' and load balancers' probes carry no credentials, so health checks stay open.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS when a client CA is set) credentials, or None for plaintext."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    client_ca = security.tls_client_ca.read_bytes() if security.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(security.tls_key.read_bytes(), security.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def read_token(path: Any) -> str:
    """The bearer token in ``path``, without surrounding whitespace.

    Raises:
        ValueError: the file is empty.
    """
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path}: the auth token file is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks with UNAUTHENTICATED unless it carries the bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle
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
    (up to --max-message-bytes) and the next interceptor would parse it, so callers without the token could fill
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
