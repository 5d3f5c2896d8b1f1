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
from typing import Literal
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

EncoderKind = Literal["text", "image"]
CacheTier = Literal["embedding", "result"]
CacheOutcome = Literal["hit", "miss", "bypass"]

NAMESPACE = "imagesearch"

# Whole RPCs: a cached text search takes about a millisecond, a CPU image search with a cold cache tens to
# hundreds of milliseconds, a bulk index stream seconds or more.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One model forward pass: from a few milliseconds (one text, GPU) to seconds (a full image batch on CPU).
BATCH_SECONDS_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Powers of two up to twice the micro-batcher's default cap (32), so a raised cap still shows.
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# One vector store call: sub-millisecond in-process (Qdrant Edge), milliseconds over the network, up to the
# store timeout (5 s by default) when the server is in trouble.
STORE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_ENCODER_KINDS: tuple[EncoderKind, ...] = ("text", "image")
_CACHE_TIERS: tuple[CacheTier, ...] = ("embedding", "result")
_CACHE_OUTCOMES: tuple[CacheOutcome, ...] = ("hit", "miss", "bypass")


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
        self.rpcs = Counter(
            "rpcs",
            "Finished RPCs by service, method and gRPC status code.",
            ["service", "method", "code"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "rpc_duration_seconds",
            "Time from the start of an RPC to its final status, by service and method.",
            ["service", "method"],
            namespace=NAMESPACE,
            buckets=RPC_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "encoder_batch_size",
            "Items per model forward pass (micro-batches of concurrent requests), by input kind.",
            ["kind"],
            namespace=NAMESPACE,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "encoder_batch_duration_seconds",
            "Time of one model forward pass, by input kind.",
            ["kind"],
            namespace=NAMESPACE,
            buckets=BATCH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "cache_lookups",
            "Cache lookups by tier (embedding, result) and outcome (hit, miss, bypass = cache off or unavailable).",
            ["tier", "outcome"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "store_duration_seconds",
            "Time of one vector store call, by operation, failed calls included.",
            ["operation"],
            namespace=NAMESPACE,
            buckets=STORE_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "store_errors",
            "Vector store calls that raised, by operation.",
            ["operation"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        # Series with known label values exist from the start at 0, so rate() and "no hits yet" dashboards work
        # before the first event instead of showing no data.
        for kind in _ENCODER_KINDS:
            self.batch_size.labels(kind)
            self.batch_seconds.labels(kind)
        for tier in _CACHE_TIERS:
            for outcome in _CACHE_OUTCOMES:
                self.cache_lookups.labels(tier, outcome)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC. `method` is gRPC's full method ("/pkg.Service/Method"); `code` a StatusCode name.

        Call it only for methods the server implements (the logging interceptor's handler-found path), so a
        client sending made-up method names cannot create unbounded label values.
        """
        service, name = split_method(method)
        self.rpcs.labels(service, name, code).inc()
        self.rpc_seconds.labels(service, name).observe(seconds)

    def observe_batch(self, kind: EncoderKind, size: int, seconds: float) -> None:
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
