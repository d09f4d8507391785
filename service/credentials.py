"""A client's side of TLS and bearer tokens, from PEM and token files: for the CLI's client commands and bench."""

from __future__ import annotations

from pathlib import Path

import grpc


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (mutual TLS with ``cert`` and ``key``) from PEM files; None for plaintext (no CA, no cert)."""
    if not (ca or cert):
        return None
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
