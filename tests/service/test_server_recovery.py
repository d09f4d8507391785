"""ConvrayServer's recovery once Ray answers again, with a stand-in registry (no Ray, no gRPC server):
it is back only when models are served again. (tests/service/test_ray_lost.py loses a real Ray.)"""

import types

from convray.service.server import ConvrayServer


class StandInRegistry:
    """Serves one version whose replica no longer answers; loading again fails until ``loads_fail`` is False."""

    def __init__(self) -> None:
        self.ready, self.loads, self.loads_fail = True, 0, True
        self.abandoned_stopping: list[bool] = []  # stop_replicas of each abandon_all
        gone = types.SimpleNamespace(describe=types.SimpleNamespace(remote=self._gone))
        self._served = [types.SimpleNamespace(pool=types.SimpleNamespace(actors=[gone]))]

    @staticmethod
    async def _gone() -> None:
        raise ConnectionError("replica gone with the old session")

    def served_versions(self) -> list:
        return list(self._served)

    async def abandon_all(self, stop_replicas: bool = False) -> None:
        self.abandoned_stopping.append(stop_replicas)
        self.ready, self._served = False, []

    async def load_latest_of_each(self) -> list[str]:
        self.loads += 1
        if self.loads_fail:
            return ["replica could not load digits version 1: its node is still rejoining"]
        self.ready = True
        return []


async def test_after_a_failed_reload_the_next_attempt_reloads_again_instead_of_declaring_ray_back():
    server = types.SimpleNamespace(registry=StandInRegistry())
    server._replicas_answer = lambda: ConvrayServer._replicas_answer(server)

    assert await ConvrayServer._recover_ray(server, rejoin=False) is False  # replicas gone; reload failed
    # Nothing is served now, so no replica can fail to answer: that must not count as the replicas answering.
    assert await ConvrayServer._recover_ray(server, rejoin=False) is False
    assert server.registry.loads == 2
    server.registry.loads_fail = False
    assert await ConvrayServer._recover_ray(server, rejoin=False) is True
    assert server.registry.ready and server.registry.loads == 3


async def test_a_reload_in_the_same_ray_session_stops_the_old_replicas_first():
    """Found in review: replicas only slow to answer lived on beside the reloaded ones, holding their CPUs until
    the server exited (in a new session Ray ends them with the old one, so they are left to it)."""
    server = types.SimpleNamespace(registry=StandInRegistry())
    server._replicas_answer = lambda: ConvrayServer._replicas_answer(server)
    await ConvrayServer._recover_ray(server, rejoin=False)
    assert server.registry.abandoned_stopping == [True]
