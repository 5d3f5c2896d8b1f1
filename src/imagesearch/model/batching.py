"""Micro-batching: concurrent requests share one model forward pass.

No fixed timer: a request that finds the model idle runs at once, and requests that arrive while a forward pass
is running are gathered, up to `max_batch`, into the next one. Under load, batches grow by themselves to the
arrival rate times the forward time, which is what a fixed wait tries to guess.

One bounded wait: items can be announced before they exist (`incoming()`: an image still being decoded). When the
model is free but announced items are on their way and the batch has room, the next forward waits for them up to
`max_wait_s`. A lone request announces nothing else, so it never waits; under load this keeps a forward from
starting with the first one or two decoded images while the rest of a burst is a few ms away.

Tracing: a forward serves several requests, so each request's trace gets its own two spans, timed from the
batch: `model.batch_wait` (from submit to the forward starting on the model thread) and `model.forward` (the
forward itself, with the batch size). The requests of one batch show the same forward interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from opentelemetry.trace import StatusCode

from imagesearch.tracing import BATCH_SIZE, ENCODER_KIND, tracer

Item = TypeVar("Item")


@dataclass
class _Forward:
    """One forward pass as the requests in it see it (epoch nanoseconds, OpenTelemetry's clock)."""

    size: int
    started_ns: int
    ended_ns: int | None = None
    failed: bool = False


@dataclass
class _Waiter(Generic[Item]):
    item: Item
    future: asyncio.Future[np.ndarray]
    forward: _Forward | None = None


class MicroBatcher(Generic[Item]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], np.ndarray],
        executor: Executor,
        max_batch: int = 32,
        on_batch: Callable[[int, float], None] | None = None,
        max_wait_s: float = 0.0,
        kind: str = "",
    ) -> None:
        self._run_batch = run_batch
        # Told (batch size, seconds) after every forward pass, failed ones included: metrics.
        self._on_batch = on_batch
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # What is batched ("text", "image"), for the spans.
        self.kind = kind
        self._pending: list[_Waiter[Item]] = []
        self._worker: asyncio.Task[None] | None = None
        self._incoming = 0
        # Set while a forward waits for announced items; resolved by each arrival or withdrawal.
        self._arrival: asyncio.Future[None] | None = None
        # Sizes of the most recent batches (tests and debugging; metrics get every batch through on_batch).
        # Bounded: a server runs millions of batches.
        self.batch_sizes: deque[int] = deque(maxlen=4096)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce an item that will be submitted when this block ends (unless it fails on the way)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wake()

    async def submit(self, item: Item) -> np.ndarray:
        """The model's output row for `item`, computed in a batch with whatever else is waiting."""
        waiter = _Waiter(item, asyncio.get_running_loop().create_future())
        queued_ns = time.time_ns()
        self._pending.append(waiter)
        self._wake()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        try:
            return await waiter.future
        finally:
            if tracer.enabled:
                self._trace(waiter, queued_ns)

    def _trace(self, waiter: _Waiter[Item], queued_ns: int) -> None:
        forward, now = waiter.forward, time.time_ns()
        wait = tracer.start_span("model.batch_wait", start_time=queued_ns, attributes={ENCODER_KIND: self.kind})
        wait.end(end_time=forward.started_ns if forward is not None else now)
        if forward is not None:
            span = tracer.start_span(
                "model.forward",
                start_time=forward.started_ns,
                attributes={ENCODER_KIND: self.kind, BATCH_SIZE: forward.size},
            )
            if forward.failed:
                span.set_status(StatusCode.ERROR, "the forward pass failed")
            span.end(end_time=forward.ended_ns or now)

    def _wake(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    async def _wait_for_incoming(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() + self.max_wait_s
        while self._incoming and len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrival = loop.create_future()
            try:
                await asyncio.wait_for(self._arrival, remaining)
            except TimeoutError:
                return
            finally:
                self._arrival = None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self.max_wait_s > 0:
                await self._wait_for_incoming(loop)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            # Callers that gave up (deadline, cancellation) while queued cost nothing.
            batch = [waiter for waiter in batch if not waiter.future.done()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            started = time.perf_counter()
            forward = _Forward(len(batch), time.time_ns())
            for waiter in batch:
                waiter.forward = forward
            try:
                rows = await loop.run_in_executor(
                    self._executor, self._timed_forward, forward, [waiter.item for waiter in batch]
                )
            except Exception as exc:  # the model failed: every caller in the batch gets the error
                forward.failed = True
                for waiter in batch:
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
                continue
            finally:
                if self._on_batch is not None:
                    self._on_batch(len(batch), time.perf_counter() - started)
            for waiter, row in zip(batch, rows, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(row)

    def _timed_forward(self, forward: _Forward, items: list[Item]) -> np.ndarray:
        # On the model thread: the forward's own start and end, without the hand-over to and from the thread.
        forward.started_ns = time.time_ns()
        try:
            return self._run_batch(items)
        finally:
            forward.ended_ns = time.time_ns()
