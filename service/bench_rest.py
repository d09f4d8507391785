"""``convray bench --api rest``: the Open Inference Protocol over HTTP/REST, sent as tritonclient.http sends it.

Each request is built once up front: its JSON and its tensor as Triton's binary data after it, asking for the
output as binary data too. One aiohttp session per client process keeps a connection per request in flight
(HTTP/1.1 carries one request at a time). Failures are counted under the gRPC code their HTTP status stands for
(429 as RESOURCE_EXHAUSTED, 503 as UNAVAILABLE), so a report reads the same whichever API it measured.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from convray.service.bench_stream import Outcome
from convray.service.errors import HTTP_STATUS

CODE_OF_STATUS: dict[int, str] = {}
for _code, _status in HTTP_STATUS.items():  # the first code listed for a status: INVALID_ARGUMENT for 400
    CODE_OF_STATUS.setdefault(_status, _code.name)
CODE_OF_STATUS[413] = "RESOURCE_EXHAUSTED"  # a body past the server's limit, as gRPC says of a message too large
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RestRequest:
    """One inference request, ready to send: its body (JSON, then binary data) and the JSON part's length."""

    body: bytes
    json_length: int


def inference_request(tensor: dict[str, Any], raw: bytes) -> RestRequest:
    """The request for one input ``tensor`` (name, shape, datatype) whose content ``raw`` goes as binary data."""
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return RestRequest(header + raw, len(header))


def ssl_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for an https server (``ca``: PEM of the CA that signed it), mutual with ``cert`` and ``key``; None: http."""
    if ca is None:
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class RestClient:
    """Calls to one server's REST port over ``session``: readiness, the model's input shape, and inference."""

    def __init__(
        self, session: aiohttp.ClientSession, server: str, tls: bool, headers: dict[str, str], timeout_s: float
    ) -> None:
        self._session, self._headers = session, headers
        self._base = f"{'https' if tls else 'http'}://{server}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s

    async def wait_live(self) -> None:
        """Return once the server answers ``/v2/health/live``.

        Raises:
            TimeoutError: it did not within the timeout.
        """
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                async with self._session.get(f"{self._base}/v2/health/live", timeout=self._timeout) as reply:
                    if reply.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):  # noqa: UP041 (not yet the builtin on Python 3.10)
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot reach a REST server at {self._base} within {self._timeout_s:g} s")
            await asyncio.sleep(0.2)

    async def input_shape(self, model: str) -> list[int]:
        """The model's ``input`` tensor shape from its metadata, e.g. [-1, 1, 8, 8].

        Raises:
            ValueError: the server refused (its message).
        """
        url = f"{self._base}/v2/models/{model}"
        async with self._session.get(url, headers=self._headers, timeout=self._timeout) as reply:
            document = await reply.json(content_type=None)
            if reply.status != 200:
                raise ValueError(f"model metadata of {model!r}: HTTP {reply.status}: {document.get('error')}")
        return list(next(t for t in document["inputs"] if t["name"] == "input")["shape"])

    def sender(self, model: str) -> RestSender:
        """Sends inference requests for ``model``."""
        return RestSender(self._session, f"{self._base}/v2/models/{model}/infer", self._headers, self._timeout)


class RestSender:
    """Sends a prepared ``RestRequest`` and returns its outcome: ("OK", "") or (the code's name, the error)."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> None:
        self._session, self._url, self._headers, self._timeout = session, url, headers, timeout

    async def __call__(self, index: int, request: RestRequest) -> Outcome:
        """Send ``request`` (``index`` is the caller's count, unused: one session serves every caller)."""
        headers = {**self._headers, HEADER_LENGTH: str(request.json_length)}
        try:
            async with self._session.post(self._url, data=request.body, headers=headers, timeout=self._timeout) as r:
                body = await r.read()
                if r.status == 200:
                    return "OK", ""
                return CODE_OF_STATUS.get(r.status, f"HTTP_{r.status}"), _error_message(body)
        except asyncio.TimeoutError:  # noqa: UP041 (not yet the builtin on Python 3.10)
            return "DEADLINE_EXCEEDED", f"no answer within {self._timeout.total:g} s"
        except aiohttp.ClientError as exc:  # the connection failed or broke: what gRPC calls UNAVAILABLE
            return "UNAVAILABLE", f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        """Nothing to finish: the session closes with the run."""


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
