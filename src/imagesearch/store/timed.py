"""A VectorStore wrapper that times every call into the metrics and a trace span (`store.<operation>`), so neither
the backends nor the handlers need to know about metrics or tracing."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from imagesearch.metrics import Metrics
from imagesearch.store.base import VectorStore
from imagesearch.tracing import tracer

# Calls that are timed: every asynchronous operation of the VectorStore protocol but close and execute (search's
# backend half, timed as search), derived from it so that a new operation is timed without being listed. Anything
# else a backend offers passes through unchanged.
TIMED_OPERATIONS = frozenset(
    name
    for name, member in vars(VectorStore).items()
    if inspect.iscoroutinefunction(member) and name not in {"close", "execute"}
)
# Not traced: the health probe pings the store every few seconds outside any RPC, each ping a trace of its own.
UNTRACED_OPERATIONS = frozenset({"ping"})


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
        span_name = f"store.{name}"
        # OpenTelemetry's database conventions; never the vectors, filters or ids.
        attributes = {"db.system.name": "qdrant", "db.operation.name": name}

        async def timed(*args: Any, **kwargs: Any) -> Any:
            with self._metrics.time_store(name):
                return await call(*args, **kwargs)

        async def traced(*args: Any, **kwargs: Any) -> Any:
            with self._metrics.time_store(name), tracer.start_as_current_span(span_name, attributes=attributes):
                return await call(*args, **kwargs)

        return timed if name in UNTRACED_OPERATIONS else traced
