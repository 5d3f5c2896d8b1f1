"""Prometheus metrics: one `Metrics` object per server, with its own registry, and an HTTP endpoint for scrapes.

Each `Metrics` owns a `CollectorRegistry` instead of using prometheus_client's global one, so several servers in
one process (the tests start many) never clash over metric names and each endpoint shows only its own server.
Call sites record through four `observe_*` methods; nothing else here needs to be known to the rest of the code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import get_args
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from imagesearch.domain import CACHE_OUTCOMES, CacheOutcome, CacheTier, Modality

NAMESPACE = "imagesearch"

# Whole RPCs: a cached text search takes about a millisecond, a CPU image search with a cold cache tens to
# hundreds of milliseconds, a bulk index stream seconds or more.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One model forward pass: from a few milliseconds (one text, GPU) to seconds (a full image batch on CPU).
BATCH_SECONDS_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Powers of two up to twice the micro-batcher's default cap (32), so a raised cap still shows.
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# One vector store call: sub-millisecond in-process (Qdrant Edge), milliseconds over the network, up to the
# store timeout (Settings.store_timeout_s) when the server is in trouble.
STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics. Cheap to create; create one per server even when no endpoint is served."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process_metrics:
            # What the global registry would have shown: CPU, memory, open files, Python version, GC. They
            # describe the whole process, so with several servers in one process each endpoint repeats them.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.rpcs = self._counter(
            "rpcs", "Finished RPCs by service, method and gRPC status code.", "service", "method", "code"
        )
        self.rpc_seconds = self._histogram(
            "rpc_duration_seconds",
            "Time from the start of an RPC to its final status, by service and method.",
            RPC_SECONDS_BUCKETS,
            "service",
            "method",
        )
        self.batch_size = self._histogram(
            "encoder_batch_size",
            "Items per model forward pass (micro-batches of concurrent requests), by input kind.",
            BATCH_SIZE_BUCKETS,
            "kind",
        )
        self.batch_seconds = self._histogram(
            "encoder_batch_duration_seconds",
            "Time of one model forward pass, by input kind.",
            BATCH_SECONDS_BUCKETS,
            "kind",
        )
        self.cache_lookups = self._counter(
            "cache_lookups",
            "Cache lookups by tier (embedding, result) and outcome (hit, miss, bypass = cache off or unavailable).",
            "tier",
            "outcome",
        )
        self.store_seconds = self._histogram(
            "store_duration_seconds",
            "Time of one vector store call, by operation, failed calls included.",
            STORE_SECONDS_BUCKETS,
            "operation",
        )
        self.store_errors = self._counter("store_errors", "Vector store calls that raised, by operation.", "operation")
        # Series with known label values exist from the start at 0, so rate() and "no hits yet" dashboards work
        # before the first event instead of showing no data.
        for kind in get_args(Modality):
            self.batch_size.labels(kind)
            self.batch_seconds.labels(kind)
        for tier in get_args(CacheTier):
            for outcome in CACHE_OUTCOMES:
                self.cache_lookups.labels(tier, outcome)

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, namespace=NAMESPACE, registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
        return Histogram(name, documentation, labels, namespace=NAMESPACE, buckets=buckets, registry=self.registry)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC. `method` is gRPC's full method ("/pkg.Service/Method"); `code` a StatusCode name.

        Call it only for methods the server implements (the logging interceptor's handler-found path), so a
        client sending made-up method names cannot create unbounded label values.
        """
        service, name = split_method(method)
        self.rpcs.labels(service, name, code).inc()
        self.rpc_seconds.labels(service, name).observe(seconds)

    def observe_batch(self, kind: Modality, size: int, seconds: float) -> None:
        """One model forward pass over `size` items."""
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def observe_cache(self, tier: CacheTier, outcome: CacheOutcome) -> None:
        """One cache lookup."""
        self.cache_lookups.labels(tier, outcome).inc()

    def observe_store(self, operation: str, seconds: float, *, failed: bool = False) -> None:
        """One vector store call (`operation`: search, upsert, get, delete, count, ping)."""
        self.store_seconds.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()

    @contextmanager
    def time_store(self, operation: str) -> Iterator[None]:
        """`with metrics.time_store("search"): await store.search(...)`. An exception counts as a failed call; a
        cancellation (the caller's deadline, a client gone) is not the store's doing and is not recorded at all,
        since its cut-short time would understate the latency."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.observe_store(operation, time.perf_counter() - started, failed=True)
            raise
        self.observe_store(operation, time.perf_counter() - started)

    def start_http_server(self, port: int, addr: str = "[::]") -> MetricsEndpoint:
        """Serve these metrics over HTTP (any path, /metrics by convention) from a daemon thread.

        `addr` takes the gRPC host's forms too ("[::]", "0.0.0.0", "127.0.0.1"); port 0 picks a free port, which
        the returned endpoint reports. Raises OSError when the address cannot be bound.
        """
        # prometheus_client resolves the address with getaddrinfo, which wants IPv6 literals without brackets.
        host = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
        try:
            server, thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        except OSError:
            if host != "::":
                raise
            # "[::]" means every interface; on a host without IPv6 that is 0.0.0.0, as gRPC does for the same value.
            server, thread = prometheus_client.start_http_server(port, addr="0.0.0.0", registry=self.registry)
        return MetricsEndpoint(port=int(server.server_port), _server=server, _thread=thread)


@dataclass
class MetricsEndpoint:
    """A running /metrics endpoint. `stop()` closes it (idempotent; blocks until the serving thread is gone)."""

    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def split_method(method: str) -> tuple[str, str]:
    """ "/imagesearch.v1.ImageSearchService/Search" -> ("imagesearch.v1.ImageSearchService", "Search")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name
