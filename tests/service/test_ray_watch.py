"""The Ray watchdog's decisions, with a scripted probe instead of a cluster (the real one: test_ray_lost.py)."""

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from convray.oip import inference_pb2 as oip
from convray.service.metrics import Metrics
from convray.service.ray_watch import RayGate, RayWatchdog
from convray.v1 import classifier_pb2 as pb
from convray.workers.cluster import RayClusterReplaced


class Script:
    """A probe that answers from a list of outcomes (None: answered; 'miss'; 'new': a new cluster), then 'then'."""

    def __init__(self, outcomes, then=None, recover_ok=True):
        self.outcomes, self.then, self.recover_ok = list(outcomes), then, recover_ok
        self.events = []

    async def probe(self):
        outcome = self.outcomes.pop(0) if self.outcomes else self.then
        if outcome == "miss":
            raise TimeoutError("GCS did not answer")
        if outcome == "new":
            raise RayClusterReplaced("WrongClusterID")

    async def on_lost(self, reason):
        self.events.append(("lost", reason))

    async def recover(self, rejoin):
        self.events.append(("recover", rejoin))
        return self.recover_ok

    async def on_back(self, lost_for):
        self.events.append(("back", round(lost_for, 1)))

    def watchdog(self, lost_exit_s=0.0, rejoin_after_s=60.0):
        return RayWatchdog(
            self.probe, self.on_lost, self.recover, self.on_back, 0.01, lost_exit_s, rejoin_after_s, RayClusterReplaced
        )


async def run_for(watchdog, seconds):
    watchdog.start()
    await asyncio.sleep(seconds)
    await watchdog.stop()


def test_one_slow_answer_is_not_a_loss():
    script = Script([None, "miss", None, "miss", None])
    asyncio.run(run_for(script.watchdog(), 0.3))
    assert script.events == []


def test_two_misses_in_a_row_are_a_loss_and_the_same_cluster_answering_again_recovers_without_rejoining():
    script = Script([None, "miss", "miss", "miss", "miss"])
    asyncio.run(run_for(script.watchdog(), 0.5))
    assert script.events[0] == ("lost", "TimeoutError: GCS did not answer")
    assert script.events[1:3] == [("recover", False), ("back", 0.0)]


def test_a_new_cluster_at_the_address_is_a_loss_at_once_and_is_rejoined():
    script = Script([None, "new"], then=None)
    asyncio.run(run_for(script.watchdog(), 0.3))
    assert script.events[0][0] == "lost" and "new Ray cluster" in script.events[0][1]
    assert script.events[1:3] == [("recover", True), ("back", 0.0)]


def test_a_silent_cluster_is_left_and_rejoined_after_rejoin_after_s():
    script = Script(["miss", "miss"], then="miss")
    asyncio.run(run_for(script.watchdog(rejoin_after_s=0.1), 0.4))
    recoveries = [e for e in script.events if e[0] == "recover"]
    assert recoveries and all(rejoin for _, rejoin in recoveries)  # never tried before rejoin_after_s: no answer


def test_still_lost_after_lost_exit_s_gives_up():
    script = Script(["miss", "miss"], then="miss", recover_ok=False)
    watchdog = script.watchdog(lost_exit_s=0.2, rejoin_after_s=0.05)

    async def scenario():
        watchdog.start()
        await asyncio.wait_for(watchdog.gave_up.wait(), 5)
        await watchdog.stop()

    asyncio.run(scenario())
    assert [e[0] for e in script.events][0] == "lost"
    assert not any(e[0] == "back" for e in script.events)


def test_stop_ends_the_watchdog_even_when_its_probe_swallows_the_cancel():
    """On Python 3.11 a cancel that arrives as a probe's wait_for completes is swallowed (found in CI: a
    server's stop then waited for ever); stop cancels again until the watchdog has ended."""
    stopping = []

    async def scenario():
        loop = asyncio.get_running_loop()

        async def probe():
            answered = loop.create_future()

            def answer():
                answered.set_result(None)
                if not stopping:  # stop while wait_for has its answer but has not yet returned it
                    stopping.append(asyncio.ensure_future(watchdog.stop()))

            loop.call_soon(answer)
            await asyncio.wait_for(answered, 5)

        async def nothing(*_):
            return True

        watchdog = RayWatchdog(probe, nothing, nothing, nothing, 0.01, 0.0, 60.0, RayClusterReplaced)
        watchdog.start()
        while not stopping:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.shield(stopping[0]), 5)
        assert watchdog._task.done()

    asyncio.run(scenario())


class _Aborted(Exception):
    pass


class _Context:
    """What the gate asks of a refused call's context: abort it (grpc.aio raises to end the handler)."""

    def __init__(self):
        self.aborted = None

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise _Aborted


async def test_a_call_refused_while_ray_is_lost_is_counted_unavailable_under_its_api_rpc_and_model():
    registry = CollectorRegistry()
    gate = RayGate(Metrics(registry), lambda name: name or "digits")
    ran = []

    async def handler(request, context):
        ran.append(request)

    infer = gate.wrap("/inference.GRPCInferenceService/ModelInfer", grpc.unary_unary_rpc_method_handler(handler))
    classify = gate.wrap("/convray.v1.Classifier/Classify", grpc.unary_unary_rpc_method_handler(handler))
    gate.close("GCS did not answer")
    for wrapped, request in [(infer, oip.ModelInferRequest(model_name="digits")), (classify, pb.ClassifyRequest())]:
        context = _Context()
        with pytest.raises(_Aborted):
            await wrapped.unary_unary(request, context)
        assert context.aborted[0] == grpc.StatusCode.UNAVAILABLE

    def count(api, rpc):
        labels = {"api": api, "rpc": rpc, "model": "digits", "code": "UNAVAILABLE"}
        return registry.get_sample_value("convray_requests_total", labels)

    assert ran == []
    assert count("oip", "ModelInfer") == 1 and count("native", "Classify") == 1
    assert registry.get_sample_value("convray_ray_unavailable_requests_total") == 2


@pytest.mark.parametrize(
    "write_s,close_after_s",
    [(0.0, 0.105), (0.2, 0.1)],
    ids=["lost while the stream works on an item", "lost while gRPC writes a reply"],
)
async def test_a_stream_in_flight_when_ray_is_lost_ends_unavailable_wherever_it_was(write_s, close_after_s):
    """gRPC iterates a stream's generator and awaits the write of each reply outside it. A cancellation landing
    in that write would end the call with no status at all (gRPC only logs a cancelled handler)."""
    gate = RayGate(Metrics(CollectorRegistry()), lambda name: name or "digits")

    async def behaviour(requests, context):
        async for item in requests:
            await asyncio.sleep(0.01)  # the item's batch, on Ray
            yield item

    async def requests():
        for item in range(100):
            yield item

    handler = gate.wrap("/convray.v1.Classifier/ClassifyStream", grpc.stream_stream_rpc_method_handler(behaviour))
    context = _Context()

    async def like_grpc() -> str:  # grpc.aio's loop for a streaming handler: next reply, then write it
        try:
            async for _reply in handler.stream_stream(requests(), context):
                await asyncio.sleep(write_s)  # the write: flow control, a slow reader
        except _Aborted:
            return "ended with a status"
        except asyncio.CancelledError:
            return "ended with no status"
        return "ended OK"

    call = asyncio.ensure_future(like_grpc())
    await asyncio.sleep(close_after_s)
    assert gate.close("GCS did not answer") == 1
    assert await asyncio.wait_for(call, 5) == "ended with a status"
    assert context.aborted[0] == grpc.StatusCode.UNAVAILABLE and "unreachable" in context.aborted[1]
    assert not gate._calls and not gate._failing and not gate._writing
