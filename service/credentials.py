"""A client's side of TLS and bearer tokens, from PEM and token files: for the CLI's client commands and bench."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (mutual TLS with ``cert`` and ``key``) from PEM files; None for plaintext (no CA, no cert)."""
    if not (ca or cert):
        return None
    import grpc  # here: service/config.py reads LOOPBACK_HOSTS from this module without needing grpc

    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def bearer_metadata(token_file: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying the token in ``token_file`` (``authorization: Bearer ...``); empty without one."""
    if not token_file:
        return ()
    return (("authorization", f"Bearer {Path(token_file).read_text(encoding='utf-8').strip()}"),)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
"""Host names that never leave this machine (``[::1]`` as written in a HOST:PORT target)."""


def cleartext_token_warning(servers: list[str], token_file: str | None, tls: bool) -> str | None:
    """A warning when a bearer token would cross the network in cleartext (no TLS, a server beyond this machine)."""
    if not token_file or tls:
        return None
    # "unix:PATH" targets never leave the machine; "HOST:PORT" or a bare HOST may
    remote = [s for s in servers if not s.startswith("unix") and (s.rpartition(":")[0] or s) not in LOOPBACK_HOSTS]
    if not remote:
        return None
    return (
        f"--token-file without TLS: the token goes to {', '.join(remote)} in cleartext, readable on the way "
        "(add --tls-ca for a TLS server)"
    )
