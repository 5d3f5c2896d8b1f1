"""OpenTelemetry tracing: one server span per RPC (continuing the caller's W3C trace) and a child span per stage.

Off unless configured with OpenTelemetry's own variables (`start`): OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER=otlp|console) turns it on where the `tracing` extra
(the SDK, the OTLP exporter, the gRPC server instrumentation) is installed. Everything else (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and its argument, OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*) is read by
the SDK itself, as anywhere else: those are the standard names, not settings of ours.

Stage code calls `tracer.start_as_current_span(...)` unconditionally. `tracer` looks up the installed provider
at each call, so a provider installed later (at start, or by a test, see `install`) takes effect at once and no
global OpenTelemetry state is set. With nothing installed a span costs one attribute read and a shared no-op
context manager.

Spans never carry image bytes, query text, an image URL's path or query (a signed URL holds credentials: its host
only) or API keys: sizes, counts, cache outcomes and the store operation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.util.types import Attributes

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger(__name__)

INSTRUMENTATION_NAME = "imagesearch"
DEFAULT_SERVICE_NAME = "imagesearch"
INSTALL_HINT = "pip install 'imagesearch[tracing]'"
# The longest the process waits at exit for queued spans to be exported.
EXPORT_AT_EXIT_S = 5.0
# Not traced: load balancers probe health every few seconds, and grpcurl's reflection calls tell nothing about
# the service's own latency.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
# The status codes that mark a server span failed (OpenTelemetry's RPC conventions: the server's fault). A
# caller's error (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...) leaves the server span's status unset.
SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

# Span attributes of ours (OpenTelemetry's semantic conventions have no names for these).
IMAGE_BYTES = "imagesearch.image.bytes"
ENCODER_KIND = "imagesearch.encoder.kind"
BATCH_SIZE = "imagesearch.encoder.batch_size"
CACHE_HIT = "imagesearch.cache.hit"
REQUEST_ID = "imagesearch.request_id"

_NO_SPAN: contextlib.nullcontext[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


class _Installed:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None


class StageTracer:
    """The tracer stage code uses: the installed provider's (looked up at each call), or none at all."""

    def start_as_current_span(
        self, name: str, *, attributes: Attributes = None
    ) -> contextlib.AbstractContextManager[trace.Span]:
        active = _Installed.tracer
        if active is None:
            return _NO_SPAN
        return active.start_as_current_span(name, attributes=attributes)

    def start_span(self, name: str, *, start_time: int | None = None, attributes: Attributes = None) -> trace.Span:
        """A span that is not made current (end it yourself): for stages timed elsewhere, such as a batched model
        forward measured on the model thread."""
        active = _Installed.tracer
        if active is None:
            return trace.INVALID_SPAN
        return active.start_span(name, start_time=start_time, attributes=attributes)

    @property
    def enabled(self) -> bool:
        """A provider is installed (its sampler may still drop a given trace)."""
        return _Installed.tracer is not None


tracer = StageTracer()


def install(provider: TracerProvider) -> None:
    """Make stage spans and servers built from now on (`server_interceptor`) use `provider`."""
    _Installed.provider = provider
    _Installed.tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version())


def uninstall() -> TracerProvider | None:
    """Back to no tracing; returns the provider that was installed (the caller shuts it down)."""
    provider, _Installed.provider, _Installed.tracer = _Installed.provider, None, None
    return provider


@contextlib.contextmanager
def installed(provider: TracerProvider) -> Iterator[TracerProvider]:
    install(provider)
    try:
        yield provider
    finally:
        uninstall()


def installed_provider() -> TracerProvider | None:
    """The provider spans go to; None while tracing is off."""
    return _Installed.provider


def server_interceptor() -> grpc.aio.ServerInterceptor | None:
    """opentelemetry-instrumentation-grpc's server interceptor on the installed provider; None when off."""
    provider = _Installed.provider
    if provider is None:
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    untraced = filters.any_of(*(filters.service_name(name) for name in UNTRACED_SERVICES))
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(
        tracer_provider=provider, filter_=filters.negate(untraced)
    )
    return interceptor


def requested_exporter(environ: Mapping[str, str]) -> str | None:
    """The exporter the OTEL_* variables ask for ("otlp", "console"), or None: tracing stays off. Unlike the
    specification's default (otlp to localhost), nothing is exported unless an endpoint or exporter is named."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters:
        return None if exporters == ["none"] else exporters[0]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return None


def start(environ: Mapping[str, str]) -> TracerProvider | None:
    """Turn tracing on if `environ` (the process's OTEL_* variables, config.otel_environment) asks for it and the
    extra is installed; log either way. Returns the installed provider (shut it down at exit: `stop`)."""
    exporter_name = requested_exporter(environ)
    if exporter_name is None:
        log.info("tracing off", enable="set OTEL_EXPORTER_OTLP_ENDPOINT")
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if exporter_name not in ("otlp", "console") or (exporter_name == "otlp" and protocol not in (None, "grpc")):
        log.warning(
            "tracing off: unsupported exporter",
            exporter=exporter_name,
            protocol=protocol,
            supported="OTEL_TRACES_EXPORTER=otlp (OTLP over gRPC) or console",
        )
        return None
    try:
        provider, exporter = _sdk_provider(exporter_name, environ)
    except ImportError as exc:
        log.warning("tracing off: the tracing extra is not installed", missing=exc.name, install=INSTALL_HINT)
        return None
    install(provider)
    resource = provider.resource.attributes
    log.info(
        "tracing on",
        exporter=exporter,
        service_name=resource.get("service.name"),
        sampler=provider.sampler.get_description(),
    )
    return provider


def stop() -> None:
    """Export what is still queued, for at most EXPORT_AT_EXIT_S, and stop tracing."""
    provider = uninstall()
    if provider is None:
        return
    # The SDK's own bound is 30 s, as long as a whole Kubernetes grace period; a backend that is down must not
    # hold the exit that long. Its export thread is a daemon: what is left is dropped with the process.
    exporting = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    exporting.start()
    exporting.join(EXPORT_AT_EXIT_S)
    if exporting.is_alive():
        log.warning("tracing: spans still queued at exit were dropped", waited_s=EXPORT_AT_EXIT_S)


def _sdk_provider(exporter_name: str, environ: Mapping[str, str]) -> tuple[TracerProvider, str]:
    # Imported here, not at the top: the `tracing` extra may be absent (ImportError: tracing stays off).
    from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: F401  (needed by the server)
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are merged in by the SDK; "imagesearch" when they name none.
    resource = Resource.create({SERVICE_VERSION: _version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
        described = "console"
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        described = f"otlp {endpoint or 'localhost:4317'}"
    # The sampler comes from OTEL_TRACES_SAMPLER (default: parentbased_always_on). Spans are exported in batches
    # from the processor's own thread, never on a request's path.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # `stop` does, with a bound
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, described


def _version() -> str:
    try:
        return version("imagesearch")
    except PackageNotFoundError:
        return "0+unknown"


def add_trace_context(
    logger: Any, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: the current span's trace_id and span_id on each log line written inside one, so an
    RPC's log line (and its request_id) leads to its trace and back."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = trace.format_trace_id(context.trace_id)
        event_dict["span_id"] = trace.format_span_id(context.span_id)
    return event_dict
