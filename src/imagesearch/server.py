"""Wiring: builds the components, the grpc.aio server and the HTTP/JSON server, runs them, and shuts them down
gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagesearch import tracing
from imagesearch.api.auth import ApiKeyFileError, ApiKeyInterceptor, ApiKeys, load_api_keys
from imagesearch.api.health import StoreHealth
from imagesearch.api.http import HttpServer, TlsFiles, bind, build_app
from imagesearch.api.interceptors import RequestLoggingInterceptor
from imagesearch.api.rules_file import RulesFileError, load_ranking_rules
from imagesearch.api.service import SERVICE, ImageSearchService, add_to_server
from imagesearch.config import Settings, otel_environment
from imagesearch.errors import ModelLoadError, StoreConfigError, StoreUnavailable
from imagesearch.metrics import Metrics
from imagesearch.model.calibration import Calibration
from imagesearch.model.encoder import AsyncEncoder, ClipEncoder, load_on_model_thread
from imagesearch.ranking import RankingSpec
from imagesearch.search.cache import CacheBackend, LruCache, NoCache, SearchCache
from imagesearch.search.catalog import Catalog, Limits
from imagesearch.search.urlfetch import FetchPolicy, ImageFetcher
from imagesearch.store import EdgeStore, QdrantServerStore, VectorStore
from imagesearch.store.timed import TimedStore

log = structlog.get_logger(__name__)

SERVICE_NAME = SERVICE.full_name
# Exit code when the server cannot start (bad config, model or store): distinct from a crash (1).
STARTUP_FAILURE = 3
# Room for a request's non-image fields (product metadata, filters) on top of the image bytes it carries.
_MESSAGE_OVERHEAD_BYTES = 256 * 1024


@dataclass
class Components:
    encoder: AsyncEncoder
    store: VectorStore
    cache: SearchCache
    fetcher: ImageFetcher
    metrics: Metrics
    # From IMAGESEARCH_API_KEYS_FILE; None: no API keys, every call is open.
    api_keys: ApiKeys | None = None
    # From IMAGESEARCH_RANKING_RULES_FILE: the rules of searches that send none; None: relevance alone.
    default_ranking: RankingSpec | None = None

    async def close(self) -> None:
        # Store last: it may flush to disk, and nothing must write to it after.
        await self.fetcher.close()
        await self.cache.close()
        self.encoder.close()
        await self.store.close()


async def open_store(settings: Settings, dimension: int, model_id: str) -> VectorStore:
    if settings.qdrant_url:
        return await QdrantServerStore.open(
            settings.qdrant_url,
            dimension=dimension,
            model_id=model_id,
            collection=settings.qdrant_collection,
            api_key=settings.qdrant_api_key,
            timeout_s=settings.store_timeout_s,
            grpc_port=settings.qdrant_grpc_port,
        )
    return await EdgeStore.open(
        settings.data_dir / "qdrant-edge",
        dimension=dimension,
        model_id=model_id,
        flush_each_write=settings.store_sync_writes,
        index_threshold=settings.store_index_threshold,
    )


def open_cache_backend(settings: Settings) -> CacheBackend:
    backend = settings.cache_backend
    if backend == "redis":
        from imagesearch.search.redis_cache import RedisCache  # only deployments with Redis pay for the import

        assert settings.redis_url is not None
        return RedisCache(settings.redis_url)
    if backend == "memory":
        return LruCache(settings.cache_memory_max_entries)
    return NoCache()


def encoder_options(settings: Settings) -> dict[str, Any]:
    """ClipEncoder.load's options (all but the model spec) from the settings."""
    return {
        "device": settings.device,
        "offline": settings.offline,
        "threads": settings.torch_threads,
        "text_weights": settings.text_weights,
        "runtime": settings.runtime,
        "precision": settings.precision,
        "runtime_cache_dir": settings.runtime_cache_dir,
        # None: on CUDA only (the setting's default); False: never.
        "device_jpeg_decode": None if settings.device_jpeg_decode else False,
        # The model layer has no images of its own to calibrate int8 on: the synthetic renders, made only if a
        # tower is quantised (a start without a cache entry).
        "calibration": _synthetic_calibration() if settings.precision == "int8" else None,
    }


def _synthetic_calibration() -> Calibration:
    from imagesearch.synthetic.calibration import CALIBRATION_SET, calibration_images

    return Calibration(CALIBRATION_SET, calibration_images)


async def open_components(settings: Settings, encoder: ClipEncoder | None = None) -> Components:
    """Read the API keys, load the model (unless given one: tests share one across servers), open the store and the
    cache."""
    # First: a bad keys or rules file is an operator's typo, reported before the minute a model can take to load.
    api_keys = (
        ApiKeys(load_api_keys(settings.api_keys_file), protect_all=settings.auth_protect_all)
        if settings.api_keys_file is not None
        else None
    )
    default_ranking = load_ranking_rules(settings.ranking_rules_file) if settings.ranking_rules_file else None
    metrics = Metrics()
    forward_thread = None
    if encoder is None:
        encoder, forward_thread = await load_on_model_thread(settings.model, **encoder_options(settings))
    async_encoder = AsyncEncoder(
        encoder,
        forward_thread=forward_thread,
        on_batch=metrics.observe_batch,
        max_batch=settings.batch_max_size,
        batch_max_wait_s=settings.batch_max_wait_ms / 1000.0,
        decode_threads=settings.decode_threads,
    )
    try:
        store = TimedStore(await open_store(settings, encoder.dimension, encoder.model_id), metrics)
    except BaseException:
        async_encoder.close()
        raise
    cache = SearchCache(
        open_cache_backend(settings),
        model_id=encoder.model_id,
        embedding_ttl_s=settings.cache_embedding_ttl_s,
        result_ttl_s=settings.cache_result_ttl_s,
        namespace=settings.cache_namespace,
    )
    hosts, networks = FetchPolicy.parse_allow_list(settings.fetch_allowed_hosts)
    fetcher = ImageFetcher(
        FetchPolicy(
            enabled=settings.fetch_image_urls,
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.fetch_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            allowed_hosts=hosts,
            allowed_networks=networks,
        )
    )
    return Components(
        encoder=async_encoder,
        store=store,  # type: ignore[arg-type]  # TimedStore delegates the whole VectorStore protocol
        cache=cache,
        fetcher=fetcher,
        metrics=metrics,
        api_keys=api_keys,
        default_ranking=default_ranking,
    )


@dataclass
class Servers:
    grpc: grpc.aio.Server
    # The gRPC port as bound (useful with port 0).
    port: int
    store_health: StoreHealth
    # The one service both ports call.
    service: ImageSearchService
    # The HTTP/JSON port's server, when IMAGESEARCH_HTTP_PORT is set.
    http: HttpServer | None = None


def build_server(settings: Settings, components: Components) -> tuple[grpc.aio.Server, int, StoreHealth]:
    """Build (not start) the gRPC server alone. Returns it, the bound port (useful with port 0) and its health
    reporter."""
    servers = build_servers(dataclasses.replace(settings, http_port=None), components)
    return servers.grpc, servers.port, servers.store_health


def build_servers(settings: Settings, components: Components) -> Servers:
    """Build (not start) the gRPC server and, when IMAGESEARCH_HTTP_PORT is set, the HTTP/JSON server, both on one
    ImageSearchService and one health servicer."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    server_span = tracing.server_interceptor()
    if server_span is not None:
        # Outermost, when tracing is on: the RPC's server span (continuing the caller's traceparent) is current
        # for everything after it, so the logging interceptor's line carries its trace_id, and the statuses set
        # after it (refusals of the interceptors, aborts of the handlers) reach the span.
        interceptors.append(server_span)
    # Binds request_id/method for every log line of the RPC and logs its final status, including the refusals of
    # the interceptors after it.
    interceptors.append(RequestLoggingInterceptor(components.metrics))
    if components.api_keys is not None:
        # Before any handler runs: an unauthenticated caller never reaches the model or the store.
        interceptors.append(ApiKeyInterceptor(components.api_keys))
    # The unary forms (SearchInline, IndexProductInline) carry a whole image in one message. grpc receives a unary
    # message whole before the handler runs (and before admission control), so one call may now hold this much;
    # streamed uploads still arrive in chunks of at most max_chunk_bytes (streams.py), under flow control.
    max_message = settings.max_image_bytes + _MESSAGE_OVERHEAD_BYTES
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", max_message), ("grpc.so_reuseport", 0)],
    )
    catalog = Catalog(
        components.encoder,
        components.store,
        components.cache,
        Limits(max_image_pixels=settings.max_image_pixels),
        components.fetcher,
        on_cache_outcome=components.metrics.observe_cache,
    )
    health_servicer = health.aio.HealthServicer()
    # "" is the whole server; clients may also ask for the service by name.
    store_health = StoreHealth(health_servicer, components.store, ("", SERVICE_NAME))
    service = ImageSearchService(catalog, settings, store_health, components.default_ranking)
    add_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        port = server.add_secure_port(settings.address, server_credentials(settings))
    else:
        port = server.add_insecure_port(settings.address)
    if port == 0:
        raise OSError(f"could not bind {settings.address}")
    http_server = None
    if settings.http_port is not None:
        http_server = build_http_server(settings, service, health_servicer, components.metrics, components.api_keys)
    return Servers(server, port, store_health, service, http_server)


def build_http_server(
    settings: Settings,
    service: ImageSearchService,
    health_servicer: health.aio.HealthServicer,
    metrics: Metrics,
    api_keys: ApiKeys | None,
) -> HttpServer:
    """The HTTP/JSON port (api/http.py) on the same service, health, keys and TLS settings as the gRPC port."""
    assert settings.http_port is not None
    app = build_app(
        service,
        health_servicer,
        metrics=metrics,
        api_keys=api_keys,
        # A unary request carries a whole image, in JSON as base64 (a third larger), plus the other fields.
        max_request_bytes=4 * math.ceil(settings.max_image_bytes / 3) + _MESSAGE_OVERHEAD_BYTES,
    )
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return HttpServer(app, bind(settings.host, settings.http_port), tls)


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the process exit code."""
    try:
        components = await open_components(settings)
    except (ApiKeyFileError, RulesFileError, ModelLoadError, StoreConfigError, StoreUnavailable) as exc:
        log.error("startup failed", error=str(exc))
        return STARTUP_FAILURE
    try:
        servers = build_servers(settings, components)
        server, port, store_health, http_server = servers.grpc, servers.port, servers.store_health, servers.http
        metrics_endpoint = (
            components.metrics.start_http_server(settings.metrics_port, settings.host)
            if settings.metrics_port
            else None
        )
    except OSError as exc:
        log.error("startup failed", error=str(exc))
        await components.close()
        return STARTUP_FAILURE
    frozen = _freeze_startup_objects()
    stop = asyncio.Event()
    force = asyncio.Event()
    model = components.encoder.describe()
    with _signals_set(stop, force):
        await server.start()
        if http_server is not None:
            await http_server.start()
        await store_health.serving()
        log.info(
            "serving",
            address=f"{settings.host}:{port}",
            http=f"{http_server.scheme}://{settings.host}:{http_server.port}" if http_server is not None else "off",
            model=model.model_id,
            device=model.device,
            image_tower=f"{model.image_runtime} {model.image_precision}",
            text_tower=f"{model.text_runtime} {model.text_path}",
            torch_threads=model.torch_threads,
            runtime_reason=model.runtime_reason,
            cpu=model.cpu,
            store=components.store.backend,
            cache=components.cache.backend.name,
            gc_frozen_objects=frozen,
        )
        await stop.wait()
        await shutdown(server, store_health, components, settings.shutdown_grace_s, force, http_server)
        if metrics_endpoint is not None:
            metrics_endpoint.stop()  # last: the drain itself can be watched
    return 0


def _freeze_startup_objects() -> int:
    """Move everything allocated at start-up (the model, torch, grpc: ~460k objects) out of the garbage
    collector's sight. A full collection otherwise walks them all: 210-260 ms measured on 2 cores with ViT-B-32
    loaded, during which every request stalls (the collector holds the GIL); with them frozen, 5 ms for 50k newer
    objects. Full collections are rare (Python runs one when surviving objects grow by a quarter, e.g. as the
    in-process cache fills), so this removes an occasional stall, not a steady cost. Start-up objects live as
    long as the process: the collector has nothing to find among them. Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def shutdown(
    server: grpc.aio.Server,
    store_health: StoreHealth,
    components: Components,
    grace_s: float,
    force: asyncio.Event,
    http: HttpServer | None = None,
) -> None:
    # 1. Health goes NOT_SERVING for good (gRPC health and GET /healthz), so load balancers stop routing here while
    #    we drain.
    await store_health.servicer.enter_graceful_shutdown()
    await store_health.close()
    log.info("shutting down", grace_s=grace_s)
    # 2. Both ports refuse new calls and let in-flight ones finish within the grace period; a second SIGINT cuts
    #    it short.
    stopping: asyncio.Future[Any] = asyncio.gather(
        server.stop(grace_s), *([http.stop(grace_s)] if http is not None else [])
    )
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        log.warning("forced exit: cancelling in-flight RPCs")
        if http is not None:
            http.force_exit()
        await server.stop(0)
        await stopping
    forced.cancel()
    # 3. Only now close the backends: no RPC can use them any more.
    await components.close()
    log.info("stopped")


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, force: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            force.set()  # second Ctrl-C: stop waiting for in-flight RPCs
        log.info("signal received", signal=sig.name)
        stop.set()

    # SIGTERM: orchestrators (Kubernetes, Docker) asking for a graceful stop. SIGINT: Ctrl-C.
    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def run(settings: Settings) -> int:
    # Around the event loop: spans still queued at exit are exported after the drain, from this thread.
    tracing.start(otel_environment())
    try:
        return asyncio.run(serve(settings))
    finally:
        tracing.stop()
