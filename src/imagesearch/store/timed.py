"""A VectorStore wrapper that times every call into the metrics, so neither the backends nor the handlers need
to know about metrics."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from imagesearch.metrics import Metrics
from imagesearch.store.base import VectorStore

# Calls that are timed: every asynchronous operation of the VectorStore protocol but close, derived from it so
# that a new operation is timed without being listed. Anything else a backend offers passes through unchanged.
TIMED_OPERATIONS = frozenset(
    name for name, member in vars(VectorStore).items() if inspect.iscoroutinefunction(member) and name != "close"
)


class TimedStore:
    def __init__(self, store: VectorStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    @property
    def backend(self) -> str:
        return self._store.backend

    @property
    def dimension(self) -> int:
        return self._store.dimension

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name not in TIMED_OPERATIONS or not callable(attribute):
            return attribute
        return self._timed(name, attribute)

    def _timed(self, name: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            with self._metrics.time_store(name):
                return await call(*args, **kwargs)

        return timed
