"""Stopping asyncio tasks for good, on the Python versions convray supports."""

from __future__ import annotations

import asyncio

CANCEL_AGAIN_AFTER_S = 0.05  # how long a cancelled task gets to end before it is cancelled again


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again for as long as it runs on.

    One ``cancel()`` is not always enough. On Python 3.11, ``asyncio.wait_for`` returns its result instead
    of raising when the cancel arrives just as the future it waits on completes, so the task goes on as if
    never cancelled, and whoever awaits it waits for ever. Found in CI: a server's stop waited on its Ray
    watchdog, whose probe had swallowed the cancel. Use this only for a task with nothing to clean up when
    cancelled: a second cancel would cut its cleanup short.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_AFTER_S)
