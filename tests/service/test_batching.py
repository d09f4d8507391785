"""The Batcher: groups concurrent requests, respects max size and delay, splits replies, loses nothing."""

import asyncio
import time

import pytest

from convray.service.batching import MIN_RETRY_AFTER_S, Batcher
from convray.service.errors import InvalidInput, ModelNotReady, Overloaded


class Recorder:
    """A run_batch that records each batch and can be held at a gate."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        return [item * 10 for item in items]


def make(run, **overrides) -> Batcher:
    options = {"max_batch_size": 4, "max_batch_wait_s": 0.05, "max_queue": 100, "max_concurrent_batches": 1}
    options.update(overrides)
    batcher = Batcher(run, **options)
    batcher.start()
    return batcher


async def test_each_request_gets_its_own_result_back():
    run = Recorder()
    batcher = make(run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    await batcher.close()


async def test_concurrent_requests_are_grouped_and_batches_never_exceed_max_size():
    run = Recorder()
    batcher = make(run, max_batch_size=4)
    await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert [len(b) for b in run.batches] == [4, 4, 2]
    assert sorted(i for b in run.batches for i in b) == list(range(10))
    await batcher.close()


async def test_a_lone_request_on_an_idle_model_goes_at_once_without_waiting_the_delay():
    run = Recorder()
    batcher = make(run, max_batch_wait_s=30.0, max_batch_size=8)
    assert await asyncio.wait_for(batcher.submit(7), timeout=5) == 70
    assert run.batches == [[7]]
    await batcher.close()


async def test_while_a_batch_runs_new_requests_wait_the_delay_to_grow_the_next_one():
    gate = asyncio.Event()
    run = Recorder(gate)
    batcher = make(run, max_batch_wait_s=0.3, max_batch_size=8, max_concurrent_batches=2)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)  # [0] went at once (idle) and is running; a second slot is free
    second = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    third = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.5)
    assert run.batches == [[0], [1, 2]]
    gate.set()
    assert await asyncio.gather(first, second, third) == [0, 10, 20]
    await batcher.close()


async def test_a_lone_request_waits_at_most_the_delay_when_idle_dispatch_is_off():
    run = Recorder()
    batcher = make(run, max_batch_wait_s=0.2, dispatch_when_idle=False)
    started = time.monotonic()
    assert await batcher.submit(7) == 70
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2.0
    assert run.batches == [[7]]
    await batcher.close()


async def test_requests_arriving_within_the_delay_join_the_batch_when_idle_dispatch_is_off():
    run = Recorder()
    batcher = make(run, max_batch_wait_s=0.3, max_batch_size=8, dispatch_when_idle=False)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(batcher.submit(2))
    assert await asyncio.gather(first, second) == [10, 20]
    assert run.batches == [[1, 2]]
    await batcher.close()


async def test_a_full_batch_goes_at_once_without_waiting_for_the_delay():
    run = Recorder()
    batcher = make(run, max_batch_wait_s=30.0, max_batch_size=3)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), timeout=5)
    assert results == [0, 10, 20]


async def test_requests_queue_while_all_batch_slots_are_busy_then_go_together():
    gate = asyncio.Event()
    run = Recorder(gate)
    batcher = make(run, max_batch_wait_s=0.0, max_batch_size=16, max_concurrent_batches=1)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)  # batch [0] is now running and holds the only slot
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.02)
    assert batcher.queue_depth == 5
    gate.set()
    assert await asyncio.gather(first, *rest) == [i * 10 for i in range(6)]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_a_full_queue_fails_fast_with_overloaded_and_says_when_a_retry_could_get_in():
    gate = asyncio.Event()
    batcher = make(Recorder(gate), max_batch_size=1, max_queue=2, max_batch_wait_s=0.0)
    running = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded, match=r"queue full \(2 of 2 places taken, 1 more requested; --max-queue\)") as soon:
        await batcher.submit(3)
    assert MIN_RETRY_AFTER_S <= soon.value.retry_after_s < 0.1
    await asyncio.sleep(0.2)
    with pytest.raises(Overloaded, match=r"retry in about 2\d\d ms") as later:
        await batcher.submit(3)
    assert 0.2 <= later.value.retry_after_s < 0.5  # as long as the oldest queued request has waited (FIFO)
    gate.set()
    assert await asyncio.gather(running, *queued) == [0, 10, 20]
    await batcher.close()


async def test_a_refusal_while_the_queue_waits_for_its_batch_to_fill_says_to_retry_after_that_wait():
    """Found in review: with batches waiting up to 1 s to fill, a full queue said "retry in about 10 ms", and a
    client's three retries all came inside the wait."""
    batcher = make(Recorder(), max_batch_size=8, max_queue=2, max_batch_wait_s=1.0, dispatch_when_idle=False)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(3)
    assert 0.8 <= refused.value.retry_after_s <= 0.9  # the batch is due 0.9 s from now, when the queue drains
    assert await asyncio.gather(*queued) == [10, 20]
    await batcher.close()


async def test_a_refusal_while_a_full_batch_waits_for_a_slot_is_not_told_to_wait_for_the_fill_time():
    """A full batch goes as soon as a slot frees, whatever --max-batch-delay-ms says (found in review: told
    0.995 s where the queue drained in 0.147 s)."""
    gate = asyncio.Event()
    batcher = make(Recorder(gate), max_batch_size=2, max_queue=2, max_batch_wait_s=1.0)
    running = asyncio.ensure_future(batcher.submit(0))  # holds the only slot until the gate opens
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(3)
    assert 0.1 <= refused.value.retry_after_s < 0.5  # as long as the oldest has waited, not the 1 s fill time
    gate.set()
    assert await asyncio.gather(running, *queued) == [0, 10, 20]
    await batcher.close()


async def test_a_failing_batch_fails_every_request_in_it_and_the_batcher_goes_on():
    calls = 0

    async def flaky(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("replica fell over")
        return items

    batcher = make(flaky, max_batch_size=2, max_batch_wait_s=0.05)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert [str(o) for o in outcomes] == ["replica fell over"] * 2
    assert await batcher.submit(3) == 3
    await batcher.close()


async def test_a_result_count_mismatch_fails_the_batch_with_both_lengths():
    async def short(items):
        return items[:-1]

    batcher = make(short, max_batch_size=3, max_batch_wait_s=0.05)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all("batch of 3 requests returned 2 results" in str(o) for o in outcomes)
    await batcher.close()


@pytest.mark.parametrize(
    ("doomed_items", "settle_s"),
    # Several images: a few turns of the loop, for the gather's cancellation to reach its caller.
    [([1], 0.0), ([1, 2, 3], 0.01)],
    ids=["one image", "a request of several images"],
)
async def test_cancelled_requests_leave_the_queue_and_never_reach_a_batch(doomed_items, settle_s):
    gate = asyncio.Event()
    run = Recorder(gate)
    batcher = make(run, max_batch_size=8, max_batch_wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(
        batcher.submit(doomed_items[0]) if len(doomed_items) == 1 else batcher.submit_many(doomed_items)
    )
    kept = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0.02)
    assert batcher.queue_depth == len(doomed_items) + 1
    doomed.cancel()
    await asyncio.sleep(settle_s)
    assert batcher.queue_depth == 1
    gate.set()
    assert await asyncio.gather(first, kept) == [0, 40]
    assert run.batches == [[0], [4]]
    await batcher.close()


async def test_close_finishes_admitted_requests_and_refuses_new_ones():
    gate = asyncio.Event()
    run = Recorder(gate)
    batcher = make(run, max_batch_size=2, max_batch_wait_s=0.0)
    admitted = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0.02)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.02)
    with pytest.raises(ModelNotReady, match="shutting down"):
        await batcher.submit(99)
    gate.set()
    await closing
    assert await asyncio.gather(*admitted) == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("cancelled_while", ["a batch is queued", "only a batch is running"])
async def test_a_cancelled_close_still_finishes_the_admitted_requests(cancelled_while):
    """An unload whose client gave up cancels its close(); the requests it admitted are answered all the same."""
    gate = asyncio.Event()
    batcher = make(Recorder(gate), max_batch_size=2, max_batch_wait_s=0.0)
    admitted = [asyncio.ensure_future(batcher.submit(i)) for i in range(2 if "only" in cancelled_while else 5)]
    await asyncio.sleep(0.02)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.02)
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*admitted), 2)
    assert results == [i * 10 for i in range(len(admitted))]
    await asyncio.wait_for(batcher.close(), 2)  # the drain, finished, is what a later close() waits on
    assert batcher.queue_depth == 0 and batcher.batches_running == 0


async def test_abort_fails_the_queued_requests_and_cancels_the_running_batch():
    batcher = make(Recorder(asyncio.Event()), max_batch_size=2, max_batch_wait_s=0.0)  # the gate never opens
    running = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 5)]
    await asyncio.sleep(0.02)
    batcher.abort("the cluster is gone")
    outcomes = await asyncio.wait_for(asyncio.gather(*running, *queued, return_exceptions=True), 2)
    # Running and queued alike: UNAVAILABLE with the reason, which clients retry (CANCELLED they would not)
    assert all(isinstance(o, ModelNotReady) and "the cluster is gone" in str(o) for o in outcomes)
    with pytest.raises(ModelNotReady):
        await batcher.submit(9)


async def test_abort_as_a_batch_is_formed_before_it_ran_a_step_still_resolves_its_requests():
    """Found in review: cancelled before its first step, the batch's ``_run`` never ran, so its requests, already
    out of the queue, were never answered."""
    started = []

    async def run(items: list[int]) -> list[int]:
        started.append(items)
        await asyncio.sleep(10)
        return items

    batcher = make(run, max_batch_size=8, max_batch_wait_s=0.0, max_concurrent_batches=2)
    request = asyncio.ensure_future(batcher.submit(1))
    for _ in range(50):  # turn the loop until the batch's task exists, then abort before it runs
        await asyncio.sleep(0)
        if batcher.batches_running:
            break
    assert batcher.batches_running == 1 and not started
    batcher.abort("the cluster is gone")
    with pytest.raises(ModelNotReady, match="the cluster is gone"):
        await asyncio.wait_for(request, 2)
    await asyncio.sleep(0)
    assert batcher.batches_running == 0


async def test_a_request_whose_first_batch_failed_runs_none_of_its_other_items():
    ran: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        await asyncio.sleep(0.02)
        ran.append(list(items))
        if 0 in items:
            raise RuntimeError("replica lost")
        return items

    batcher = make(run, max_batch_size=2, max_batch_wait_s=0.0)
    with pytest.raises(RuntimeError, match="replica lost"):
        await batcher.submit_many(list(range(8)))
    await asyncio.sleep(0.1)
    assert ran == [[0, 1]] and batcher.queue_depth == 0
    await batcher.close()


def test_invalid_limits_are_refused_with_the_values():
    with pytest.raises(ValueError, match="got 0, 1, 1, 0.0"):
        Batcher(Recorder(), max_batch_size=0, max_batch_wait_s=0.0, max_queue=1, max_concurrent_batches=1)


async def test_submit_many_returns_results_in_order_through_the_same_batches():
    run = Recorder()
    batcher = make(run, max_batch_size=16, max_batch_wait_s=0.1)
    many = asyncio.ensure_future(batcher.submit_many([1, 2, 3]))
    single = asyncio.ensure_future(batcher.submit(4))
    assert await many == [10, 20, 30] and await single == 40
    assert run.batches == [[1, 2, 3, 4]]
    await batcher.close()


async def test_submit_many_is_all_or_nothing_when_the_queue_is_short():
    gate = asyncio.Event()
    batcher = make(Recorder(gate), max_batch_size=1, max_queue=3, max_batch_wait_s=0.0)
    running = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)
    queued = asyncio.ensure_future(batcher.submit(9))
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded, match="1 of 3 places taken, 3 more requested"):
        await batcher.submit_many([1, 2, 3])
    assert batcher.queue_depth == 1
    gate.set()
    assert await asyncio.gather(running, queued) == [0, 90]
    assert await batcher.submit_many([1, 2, 3]) == [10, 20, 30]
    await batcher.close()


async def test_places_held_while_images_decode_count_against_the_queue_and_are_given_back():
    """Found in review: requests waiting for the decoder were not counted, so the backlog before the queue had no
    bound (6 MB PNGs took a front end from 345 to 1,576 MiB and its refusals came 9.7 s late)."""
    batcher = make(Recorder(), max_queue=3)
    with batcher.places(2):  # two images being decoded
        with pytest.raises(Overloaded, match="2 of 3 places taken, 2 more requested"):
            with batcher.places(2):  # refused before its decoding started
                pass
        with pytest.raises(Overloaded, match="2 of 3 places taken, 2 more requested"):
            await batcher.submit_many([7, 8])
        assert await batcher.submit(1) == 10  # one place was free
    with pytest.raises(ZeroDivisionError), batcher.places(3):  # a decode that fails gives its places back
        raise ZeroDivisionError
    with batcher.places(3):
        pass
    assert await batcher.submit_many([1, 2, 3]) == [10, 20, 30]  # submitted as the block is left: all the room back
    with pytest.raises(InvalidInput, match="more than its whole queue holds"), batcher.places(4):
        pass
    await batcher.close()
    with pytest.raises(ModelNotReady), batcher.places(1):
        pass


async def test_a_refusal_while_places_are_held_for_decoding_says_to_wait_as_long_as_the_oldest_has():
    """Found in review: with the queue empty and its places held by decodes, the advice was the 10 ms minimum."""
    batcher = make(Recorder(), max_queue=2)
    with batcher.places(2):
        await asyncio.sleep(0.3)  # a slow decode
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(1)
    assert refused.value.retry_after_s >= 0.3
    await batcher.close()


async def test_more_items_than_the_whole_queue_holds_are_invalid_not_a_reason_to_retry():
    batcher = make(Recorder(), max_queue=3)
    with pytest.raises(
        InvalidInput, match=r"4 items in one request, more than its whole queue holds \(3, --max-queue\)"
    ):
        await batcher.submit_many([1, 2, 3, 4])
    assert batcher.queue_depth == 0
    await batcher.close()


async def test_a_batch_waits_for_a_running_one_while_may_start_says_no_and_then_takes_the_whole_queue():
    gate = asyncio.Event()
    run = Recorder(gate)
    asked: list[int] = []

    def may_start(running: int) -> bool:
        asked.append(running)
        return False

    batcher = make(run, max_batch_wait_s=0.0, max_batch_size=16, max_concurrent_batches=2, may_start=may_start)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    assert run.batches == [[0]]  # a second slot is free, but may_start said no
    assert asked and set(asked) == {1}
    gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_without_may_start_a_second_batch_runs_beside_the_first():
    gate = asyncio.Event()
    run = Recorder(gate)
    batcher = make(run, max_batch_wait_s=0.0, max_batch_size=16, max_concurrent_batches=2)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)
    assert run.batches == [[0], [1]]
    gate.set()
    assert await asyncio.gather(first, second) == [0, 10]
    await batcher.close()
