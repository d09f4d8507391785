"""Which event loop runs a front end, and running the server on it.

uvloop (libuv's event loop, in C) spends less per turn than asyncio's own in Python, and a ModelInfer call
costs about five turns of grpc.aio's loop (accepting a call alone takes that many), so at concurrency 32 the
front end served 9-14% more with it, its event loop using about 10% less CPU per request (docs/benchmarks.md).
asyncio stays as the fallback: where uvloop is not installed (it has no Windows build) or with
``--event-loop asyncio``.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


def resolve(choice: EventLoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop ``choice`` means here: ``auto`` is uvloop where it is installed, else asyncio.

    Raises:
        RuntimeError: uvloop was asked for but is not installed.
    """
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise RuntimeError("--event-loop uvloop, but uvloop is not installed (pip install uvloop; no Windows build)")
    if choice == "auto":
        return "uvloop" if installed else "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """``asyncio.run(main)`` on a new event loop of ``choice`` (``resolve``)."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
