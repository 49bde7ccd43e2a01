"""The endpoint's shared queue, in plain asyncio: what waits while the model is busy goes in one batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from ray_whisper.serve.queue import BatchQueue


class Model:
    """A batch function that takes `busy_s` per batch and records the batches it saw."""

    def __init__(self, busy_s: float = 0.2, fail_on: object = None):
        self.busy_s, self.fail_on, self.batches = busy_s, fail_on, []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.busy_s)
        if self.fail_on in items:
            raise RuntimeError("out of memory")
        return [item * 10 for item in items]


def test_arrivals_while_the_model_is_busy_share_the_next_batch():
    model = Model(busy_s=0.3)

    async def scenario():
        queue = BatchQueue(model, max_batch_size=16, wait_s=0.01)
        first = asyncio.ensure_future(queue.submit(0))
        await asyncio.sleep(0.05)  # the first batch ([0]) is running
        later = []
        for i in range(1, 10):  # trickling in, 20 ms apart: more than wait_s apart, all within one busy stretch
            later.append(asyncio.ensure_future(queue.submit(i)))
            await asyncio.sleep(0.02)
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert first == 0 and later == [i * 10 for i in range(1, 10)]
    assert model.batches == [[0], list(range(1, 10))]


def test_an_idle_model_waits_at_most_wait_s_and_never_exceeds_max_batch_size():
    model = Model(busy_s=0.0)

    async def scenario():
        queue = BatchQueue(model, max_batch_size=4, wait_s=0.2)
        started = time.monotonic()
        alone = await queue.submit(7)
        waited = time.monotonic() - started
        results = await asyncio.gather(*(queue.submit(i) for i in range(10)))
        return alone, waited, results

    alone, waited, results = asyncio.run(scenario())
    assert alone == 70 and 0.15 < waited < 1.0
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in model.batches] == [1, 4, 4, 2]


def test_a_failed_batch_fails_its_callers_only_and_the_queue_goes_on():
    model = Model(busy_s=0.05, fail_on=3)

    async def scenario():
        queue = BatchQueue(model, max_batch_size=8, wait_s=0.05)
        failed = await asyncio.gather(*(queue.submit(i) for i in (2, 3)), return_exceptions=True)
        return failed, await queue.submit(5)

    failed, after = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in failed)
    assert after == 50


def test_a_caller_that_went_away_is_not_decoded():
    model = Model(busy_s=0.2)

    async def scenario():
        queue = BatchQueue(model, max_batch_size=8, wait_s=0.0)
        running = asyncio.ensure_future(queue.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(queue.submit(2))
        kept = asyncio.ensure_future(queue.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await running, await kept

    assert asyncio.run(scenario()) == (10, 30)
    assert model.batches == [[1], [3]]


def test_a_batch_function_returning_the_wrong_count_is_an_error_not_a_hang():
    async def short(items: list) -> list:
        return items[:-1]

    async def scenario():
        queue = BatchQueue(short, max_batch_size=8, wait_s=0.05)
        return await asyncio.wait_for(asyncio.gather(queue.submit(1), queue.submit(2), return_exceptions=True), 5)

    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        raise asyncio.run(scenario())[0]
