"""Micro-batching: concurrent requests share one model forward pass.

No timer: a request that finds the model idle is run at once (a lone request never waits), and requests that
arrive while a forward pass is running are gathered, up to `max_batch`, into the next one. Under load, batches
grow by themselves to the arrival rate times the forward time, which is what a fixed wait tries to guess.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

import numpy as np

Item = TypeVar("Item")


class MicroBatcher(Generic[Item]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], np.ndarray],
        executor: Executor,
        max_batch: int = 32,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        # Told (batch size, seconds) after every forward pass, failed ones included: metrics.
        self._on_batch = on_batch
        self._executor = executor
        self.max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[np.ndarray]]] = []
        self._worker: asyncio.Task[None] | None = None
        # Sizes of the most recent batches (tests and debugging; metrics get every batch through on_batch).
        # Bounded: a server runs millions of batches.
        self.batch_sizes: deque[int] = deque(maxlen=4096)

    async def submit(self, item: Item) -> np.ndarray:
        """The model's output row for `item`, computed in a batch with whatever else is waiting."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            # Callers that gave up (deadline, cancellation) while queued cost nothing.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._executor, self._run_batch, [item for item, _ in batch])
            except Exception as exc:  # the model failed: every caller in the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                if self._on_batch is not None:
                    self._on_batch(len(batch), time.perf_counter() - started)
            for (_, future), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)
