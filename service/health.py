"""grpc's health service, with its ``Watch`` streams bounded."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

MAX_HEALTH_WATCHES = 1_000
"""``Watch`` streams open at once in one front end, over its main and health ports together."""


class HealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer; past ``MAX_HEALTH_WATCHES`` open ``Watch`` streams a new one is refused.

    Health checks need no token (probes cannot send one), so anyone who reaches the port could open ``Watch``
    streams, each held until its client leaves: 20,000 took about 250 MiB in a review. Probes use ``Check``,
    which is untouched.
    """

    def __init__(self, max_watches: int | None = None) -> None:
        """``max_watches``: ``MAX_HEALTH_WATCHES`` unless given."""
        super().__init__()
        self.max_watches = MAX_HEALTH_WATCHES if max_watches is None else max_watches
        self.watches = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 (gRPC's name)
        """Stream the service's status as it changes, unless ``max_watches`` streams are open already.

        Raises:
            grpc.aio.AbortError: RESOURCE_EXHAUSTED past the limit (``context.abort``).
        """
        if self.watches >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server has {self.watches} health Watch streams open, its limit; use Check, or retry later",
            )
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1
