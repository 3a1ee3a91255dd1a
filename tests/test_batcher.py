"""`service.batcher.MicroBatcher` on its own: concurrent submits are processed together, up to the batch size, and
an item's error reaches that item's caller only."""

from __future__ import annotations

import asyncio
from typing import Any

from service.batcher import MicroBatcher


def test_batcher_isolates_item_errors_and_batches_concurrent_submits() -> None:
    seen: list[list[int]] = []

    async def process(items: Any) -> list[int | BaseException]:
        seen.append(list(items))
        await asyncio.sleep(0.001)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def run() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch=4)
        return await asyncio.gather(*(batcher.submit(i) for i in [1, 2, -3, 4, 5, 6]), return_exceptions=True)

    results = asyncio.run(run())
    assert results[:2] == [10, 20] and results[3:] == [40, 50, 60]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad -3"
    assert [len(batch) for batch in seen] == [4, 2]
