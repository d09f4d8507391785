"""service.inference: run_resolved re-resolves a request whose version is retired on its way; the Classifier."""

import asyncio

import pytest

from convray.service.errors import ModelNotFound, ModelNotReady
from convray.service.inference import Classifier, run_resolved
from convray.workers.direct import ReplicaUnreachable


class Registry:
    """Serves version 1, then (after ``switch``) only version 2, like a poller switching versions."""

    def __init__(self) -> None:
        self.loaded = {1: "digits v1"}

    def switch(self) -> None:
        self.loaded = {2: "digits v2"}

    def resolve(self, name: str, version: int) -> str:
        if version == 0:
            return self.loaded[max(self.loaded)]
        if version not in self.loaded:
            raise ModelNotFound(f"version {version} of model {name!r} is not loaded")
        return self.loaded[version]

    resolve_serving = resolve  # every version here has a replica able to serve

    def serves(self, served: str) -> bool:
        return served in self.loaded.values()


def retired_on_first_try(registry: Registry):
    calls = []

    async def work(served: str) -> str:
        calls.append(served)
        if len(calls) == 1:
            registry.switch()  # the switch happens while the request is on its way
            raise ModelNotReady("model 'digits' version 1 is shutting down")
        return served

    return work, calls


async def test_a_latest_version_request_caught_by_a_switch_runs_on_the_new_version():
    registry = Registry()
    work, calls = retired_on_first_try(registry)
    assert await run_resolved(registry, "digits", 0, work) == "digits v2"  # type: ignore[arg-type]
    assert calls == ["digits v1", "digits v2"]


async def test_a_request_naming_the_retired_version_gets_not_found():
    registry = Registry()
    work, _ = retired_on_first_try(registry)
    with pytest.raises(ModelNotFound):
        await run_resolved(registry, "digits", 1, work)  # type: ignore[arg-type]


async def test_a_draining_server_still_refuses_with_model_not_ready():
    registry = Registry()

    async def draining(served: str) -> str:
        raise ModelNotReady("server is shutting down")

    with pytest.raises(ModelNotReady):
        await run_resolved(registry, "digits", 0, draining)  # type: ignore[arg-type]


async def test_a_call_past_the_batcher_that_finds_its_versions_replicas_stopped_runs_on_the_new_version():
    """Explain calls the replicas directly: a switch that stopped them while the image decoded answered UNAVAILABLE
    (found in review); now such a call moves to the new version like a batched one."""
    registry = Registry()
    calls = []

    async def explain(served: str) -> str:
        calls.append(served)
        if len(calls) == 1:
            registry.switch()
            raise ReplicaUnreachable("digits version 1 was unloaded; retry")
        return served

    assert await run_resolved(registry, "digits", 0, explain) == "digits v2"
    assert calls == ["digits v1", "digits v2"]


async def test_a_request_whose_image_fails_to_decode_drops_its_other_decodes_not_yet_started(monkeypatch):
    """Found in review: the first image's refusal gave the request's queue places back while its other images
    still waited for the decoder, so a stream of such requests left the decode backlog unbounded again."""
    import asyncio
    import time
    import types
    from concurrent.futures import ThreadPoolExecutor

    from convray.service import inference
    from convray.service.batching import Batcher
    from convray.service.codecs import DecodeLimits
    from convray.service.errors import InvalidInput

    decoded = []

    def decode_image(data, contract, limits):
        decoded.append(data)
        if data == b"bad":
            raise InvalidInput("not a decodable image")
        time.sleep(0.05)

    monkeypatch.setattr(inference, "decode_image", decode_image)
    batcher = Batcher(
        lambda items: items, max_batch_size=4, max_batch_wait_s=0.0, max_queue=8, max_concurrent_batches=1
    )
    served = types.SimpleNamespace(name="digits", batcher=batcher, metadata=types.SimpleNamespace(input=None),
                                   stats=types.SimpleNamespace(record_request=lambda *args: None))  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as decoder:  # one thread: the bad image first, the others queued
        limits = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, max_request_pixels=1 << 30)
        classifier = Classifier(None, limits, default_top_k=1, decoder=decoder, metrics=None)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="image 1 of 4"):
            await classifier.infer_images(served, [b"bad", b"a", b"b", b"c"])
        await asyncio.sleep(0.3)  # the cancellations reach the executor on the loop's next turns
    # The thread may have taken the next image as the first failed; the two after it never ran.
    assert decoded[0] == b"bad" and len(decoded) <= 2 and batcher._reserved == 0


async def test_base64_images_are_unwrapped_on_the_decode_pool_not_on_the_event_loop(monkeypatch):
    """Found in review: base64 decoding took about 5 ms per MB on the loop, stalling every other request."""
    import threading
    import types
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from prometheus_client import CollectorRegistry

    from convray.service import inference
    from convray.service.batching import Batcher
    from convray.service.codecs import DecodeLimits
    from convray.service.errors import InvalidInput
    from convray.service.metrics import Metrics
    from convray.service.oip_codec import from_base64

    decoded, unwrapped_on = [], []

    def decode_image(data, contract, limits):
        decoded.append(data)
        return np.zeros((1, 8, 8), np.uint8)

    def unwrap(texts):
        unwrapped_on.append(threading.current_thread())
        return from_base64(texts)

    monkeypatch.setattr(inference, "decode_image", decode_image)
    batcher = Batcher(
        lambda items: items, max_batch_size=4, max_batch_wait_s=0.0, max_queue=8, max_concurrent_batches=1
    )
    batcher.start()
    served = types.SimpleNamespace(name="digits", batcher=batcher, metadata=types.SimpleNamespace(input=None),
                                   stats=types.SimpleNamespace(record_request=lambda *args: None))  # fmt: skip
    limits = DecodeLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 20, max_request_pixels=1 << 30)
    with ThreadPoolExecutor(max_workers=1) as decoder:
        metrics = Metrics(CollectorRegistry())
        classifier = Classifier(None, limits, default_top_k=1, decoder=decoder, metrics=metrics)  # type: ignore[arg-type]
        classifier.infer_pixels = lambda served, pixels, deadline, received: asyncio.sleep(0, pixels)  # no batch
        await classifier.infer_images(served, [b"aW1hZ2Ux", b"aW1hZ2Uy"], unwrap=unwrap)
        assert decoded == [b"image1", b"image2"]
        assert unwrapped_on and unwrapped_on[0] is not threading.current_thread()
        with pytest.raises(InvalidInput, match="image 2 of 2 is not base64"):
            await classifier.infer_images(served, [b"aW1hZ2Ux", b"not base64!"], unwrap=unwrap)
    assert batcher._reserved == 0  # the refused request gave its queue places back
