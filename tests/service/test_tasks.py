"""cancel_and_wait: a task told to stop ends, even one that lets a cancel pass."""

import asyncio

from convray.service.tasks import cancel_and_wait


def test_a_task_that_lets_the_first_cancel_pass_is_cancelled_again_until_it_ends():
    cancels_seen = []

    async def shrugs_off_one_cancel():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels_seen.append(True)
                if len(cancels_seen) > 1:
                    raise

    async def scenario():
        task = asyncio.ensure_future(shrugs_off_one_cancel())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task), 5)
        assert task.cancelled()

    asyncio.run(scenario())
    assert len(cancels_seen) == 2


def test_a_task_already_done_is_left_as_it_was():
    async def scenario():
        task = asyncio.ensure_future(asyncio.sleep(0, result="answer"))
        await task
        await cancel_and_wait(task)
        assert task.result() == "answer"

    asyncio.run(scenario())
