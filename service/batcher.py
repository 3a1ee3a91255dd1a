"""`MicroBatcher`: gathers concurrent requests on the event loop and processes them as ONE batch.

Used by the `POST /v1/recommendations` route: one Redis read, one user-tower forward and one index search
serve every request that arrived while the previous batch was busy, instead of one of each per request.

How a batch forms (no timer at low load, so a lone request pays nothing for batching):
- the first request that finds the batcher idle becomes the leader: it yields to the loop once (requests
  already read from their sockets in this loop iteration join), optionally waits up to `max_wait` seconds
  while fewer than `max_batch` are queued, then processes up to `max_batch` queued items, its own first;
- while a batch is being processed (its Redis round trip is awaited on the loop), new requests queue up;
  when the batch is done, a runner task processes the queue in batches of up to `max_batch` until it is empty.

`process(items)` returns one result per item, in order; an item's result may be an exception, which is raised
to that item's caller only (one request's bad input never fails its batch-mates). If `process` itself raises,
every caller of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Process = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class MicroBatcher(Generic[T, R]):
    """Batches concurrent `submit` calls (one event loop); see the module docstring."""

    def __init__(self, process: Process[T, R], *, max_batch: int = 32, max_wait: float = 0.0) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # counters, for tests and the benchmark's notes
        self.items = 0

    async def submit(self, item: T) -> R:
        """Process `item` in the next batch and return its result (or raise its exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._busy:
            self._busy = True
            try:
                await self._batch()  # the leader: its own item is the first of this batch
            finally:
                self._hand_over()
        return await future

    def _hand_over(self) -> None:
        if self._queue:
            self._runner = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._batch()
        finally:
            self._runner = None
            if self._queue:  # only if the loop above was cancelled midway: don't strand the rest
                self._hand_over()
            else:
                self._busy = False

    async def _batch(self) -> None:
        await asyncio.sleep(0)  # let requests parsed in this loop iteration join
        if self.max_wait > 0 and len(self._queue) < self.max_batch:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_wait
            while len(self._queue) < self.max_batch and loop.time() < deadline:
                await asyncio.sleep(min(deadline - loop.time(), self.max_wait / 4))
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self.process([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for a batch of {len(batch)}")
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        except BaseException:  # cancelled (the leader's request went away): its batch-mates must not hang
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
