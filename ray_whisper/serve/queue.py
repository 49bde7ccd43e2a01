"""The endpoint's shared queue: chunks of every request in flight, drained in batches whenever the model is free.

A leaf (asyncio only). Why not `@serve.batch`: in Ray Serve 2.60 it forms the next batch while the previous one
still runs (the batch loop only waits for a semaphore after cutting the batch), so on a model that takes
seconds per batch the arrivals of one busy stretch are cut into many small batches, one per
`batch_wait_timeout_s` ([3, 5, 6, 2] for 16 concurrent clips, measured by benchmarks/serve.py). Here a batch
is cut only when the model can take it: everything that queued while it was busy goes together (up to
`max_batch_size`), and a chunk that arrives to an idle model waits at most `wait_s` for company.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")


class Expired(TimeoutError):
    """An item waited longer than the queue's max_wait_s for its batch: refused before any work on it."""


class BatchQueue(Generic[Item]):
    """`await queue.submit(item)` -> that item's result from `run(batch)`, a coroutine taking a list of items and
    returning one result per item, in order. One batch runs at a time. An exception from `run` reaches every
    item of its batch; the queue goes on with the next. Items whose caller went away are dropped before
    their batch runs, and items that waited longer than max_wait_s (None: no limit) get Expired instead."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float,
                 max_wait_s: float | None = None):
        self.run, self.max_batch_size, self.wait_s, self.max_wait_s = run, max_batch_size, wait_s, max_wait_s
        self._pending: collections.deque[tuple[Item, asyncio.Future, float]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Items queued for a batch that has not started."""
        return len(self._pending)

    async def submit(self, item: Item) -> Any:
        loop = asyncio.get_running_loop()
        if self._consumer is None or self._consumer.done():  # started in the loop that serves the requests
            self._arrived = asyncio.Event()
            self._consumer = loop.create_task(self._consume())
        future = loop.create_future()
        self._pending.append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def _consume(self) -> None:
        while True:
            await self._gather()
            batch = self._cut()
            if batch:
                await self._run(batch)

    async def _gather(self) -> None:
        """Until the oldest waiting item has waited wait_s, or a full batch is waiting."""
        assert self._arrived is not None
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0][2] + self.wait_s
        while len(self._pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break

    def _cut(self) -> list[tuple[Item, asyncio.Future]]:
        batch = []
        now = time.monotonic()
        while self._pending and len(batch) < self.max_batch_size:
            item, future, since = self._pending.popleft()
            if future.done():  # a cancelled caller's item is not decoded
                continue
            if self.max_wait_s is not None and now - since > self.max_wait_s:
                future.set_exception(Expired(f"waited {now - since:.1f} s for a batch (limit {self.max_wait_s:g} s)"))
                continue
            batch.append((item, future))
        return batch

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - the error belongs to the batch's callers, not to the queue
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
