"""OpenTelemetry tracing through the real gRPC server: an in-memory exporter records the span tree of each RPC.

The provider is installed for one test at a time (tracing.installed), never as OpenTelemetry's global one, so no
other test sees spans. Skipped where the `tracing` extra is not installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed")
pytest.importorskip("opentelemetry.instrumentation.grpc", reason="the tracing extra is not installed")

import structlog
from conftest import RunningServer, free_port, jpeg_bytes, start_server, stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import QuietHandler, http_server, raising, serve_process
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from rpc import chunks, product, stream

from imagesearch import tracing
from imagesearch.client import search_query
from imagesearch.config import Settings
from imagesearch.errors import StoreUnavailable
from imagesearch.logs import _SHARED_PROCESSORS
from imagesearch.model.encoder import ClipEncoder
from imagesearch.v1 import image_search_service_pb2 as pb

SERVICE = "imagesearch.v1.ImageSearchService"
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
CORRUPT_FRAME = b"\xff\xff\xff\xff\x0f" * 4


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource({"service.name": "imagesearch-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.installed(provider):
        yield exporter
    provider.shutdown()


@pytest.fixture
async def traced(spans: InMemorySpanExporter, settings: Settings, encoder: ClipEncoder) -> AsyncIterator[RunningServer]:
    # Built after `spans` installed the provider: build_server adds the tracing interceptor only then.
    started = await start_server(settings, encoder)
    try:
        yield started
    finally:
        await stop_server(started)


async def server_span(spans: InMemorySpanExporter, method: str) -> ReadableSpan:
    """The one server span of `method`. A server span ends as the status is sent, so the client may see the
    status a moment before the span is exported: wait for it (a generous bound on a busy machine)."""
    name = f"/{SERVICE}/{method}"
    deadline = time.monotonic() + 30
    while True:
        found = [s for s in spans.get_finished_spans() if s.name == name]
        if found or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    [span] = found
    assert span.kind == SpanKind.SERVER
    return span


def children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    """Direct children of `parent`, in the order they started."""
    assert parent.context is not None
    found = [
        s for s in spans.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def names(spans: list[ReadableSpan]) -> list[str]:
    return [s.name for s in spans]


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def attribute_values(spans: InMemorySpanExporter) -> list[Any]:
    values: list[Any] = []
    for span in spans.get_finished_spans():
        values += list((span.attributes or {}).values())
        for event in span.events:
            values += list((event.attributes or {}).values())
    return values


async def test_text_search_has_a_server_span_with_a_child_per_stage(
    traced: RunningServer, spans: InMemorySpanExporter
) -> None:
    query = pb.SearchRequest(query=search_query(text="a secret red mug"))
    await traced.stub.Search(stream(query), metadata=(("x-request-id", "req-text-1"),))

    root = await server_span(spans, "Search")
    assert root.parent is None  # no caller trace: a new one starts here
    assert root.attributes is not None
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.service"] == SERVICE
    assert root.attributes["rpc.method"] == "Search"
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert root.attributes[tracing.REQUEST_ID] == "req-text-1"
    stages = children(spans, root)
    assert names(stages) == [
        "upload.read",
        "cache.embedding.get",
        "model.batch_wait",
        "model.forward",
        "cache.result.get",
        "store.search",
    ]
    forward = only(stages, "model.forward")
    assert forward.attributes == {tracing.ENCODER_KIND: "text", tracing.BATCH_SIZE: 1}
    assert only(stages, "cache.embedding.get").attributes == {tracing.CACHE_HIT: False}
    store = only(stages, "store.search").attributes
    assert store is not None and store["db.operation.name"] == "search"
    # Stages lie within the RPC; the wait for a batch ends where the forward starts.
    for stage in stages:
        assert root.start_time and root.end_time and stage.start_time and stage.end_time
        assert root.start_time <= stage.start_time <= stage.end_time <= root.end_time
    assert only(stages, "model.batch_wait").end_time == forward.start_time
    assert not any("secret" in str(value) for value in attribute_values(spans))

    # The repeat is answered by the cache: no model, no store.
    spans.clear()
    await traced.stub.Search(stream(query))
    stages = children(spans, await server_span(spans, "Search"))
    assert names(stages) == ["upload.read", "cache.embedding.get", "cache.result.get"]
    assert only(stages, "cache.result.get").attributes == {tracing.CACHE_HIT: True}


async def test_image_search_traces_the_upload_decode_and_forward(
    traced: RunningServer, spans: InMemorySpanExporter
) -> None:
    image = jpeg_bytes((10, 200, 30), size=(300, 200))
    messages = [pb.SearchRequest(query=search_query())]
    messages += [pb.SearchRequest(image_chunk=c) for c in chunks(image, 1024)]
    await traced.stub.Search(stream(*messages))

    stages = children(spans, await server_span(spans, "Search"))
    assert names(stages) == [
        "upload.read",
        "cache.embedding.get",
        "image.decode",
        "model.batch_wait",
        "model.forward",
        "cache.result.get",
        "store.search",
    ]
    assert only(stages, "upload.read").attributes == {tracing.IMAGE_BYTES: len(image)}
    assert only(stages, "image.decode").attributes == {tracing.IMAGE_BYTES: len(image)}
    assert only(stages, "model.forward").attributes == {tracing.ENCODER_KIND: "image", tracing.BATCH_SIZE: 1}
    assert not any(isinstance(value, bytes) for value in attribute_values(spans))


class _OneImage(QuietHandler):
    body = jpeg_bytes((200, 120, 0))

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture
def image_host() -> Iterator[str]:
    with http_server(_OneImage) as port:
        yield f"127.0.0.1:{port}"


async def test_search_by_url_traces_the_fetch_with_the_host_only(
    spans: InMemorySpanExporter, settings: Settings, encoder: ClipEncoder, image_host: str
) -> None:
    settings = dataclasses.replace(settings, fetch_image_urls=True, fetch_allowed_hosts="127.0.0.1")
    running = await start_server(settings, encoder)
    try:
        url = f"http://{image_host}/shoe.jpg?signature=secret-token"
        await running.stub.Search(stream(pb.SearchRequest(query=search_query(image_url=url))))
    finally:
        await stop_server(running)

    stages = children(spans, await server_span(spans, "Search"))
    assert names(stages)[:3] == ["upload.read", "image.fetch", "cache.embedding.get"]
    fetch = only(stages, "image.fetch")
    assert fetch.attributes == {"server.address": "127.0.0.1", tracing.IMAGE_BYTES: len(_OneImage.body)}
    assert not any("secret-token" in str(value) for value in attribute_values(spans))


async def test_bulk_import_traces_each_products_encode_and_the_batched_write(
    traced: RunningServer, spans: InMemorySpanExporter
) -> None:
    messages: list[pb.IndexProductsRequest] = []
    for i in range(3):
        messages.append(pb.IndexProductsRequest(product=product(f"bulk-{i}", category="mugs")))
        messages += [pb.IndexProductsRequest(image_chunk=c) for c in chunks(jpeg_bytes((40 * i, 90, 200)), 4096)]
    responses = [r async for r in traced.stub.IndexProducts(stream(*messages))]
    assert [r.id for r in responses] == ["bulk-0", "bulk-1", "bulk-2"]

    root = await server_span(spans, "IndexProducts")
    assert root.attributes is not None and root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    stages = children(spans, root)
    counts = {name: names(stages).count(name) for name in set(names(stages))}
    assert counts["image.decode"] == counts["model.batch_wait"] == counts["model.forward"] == 3
    assert counts["store.upsert"] >= 1  # written in batches
    forwards = [s for s in stages if s.name == "model.forward"]
    # A batch serves several products: each product's trace shows the forward it was part of, with its size.
    for forward in forwards:
        assert forward.attributes is not None
        size = forward.attributes[tracing.BATCH_SIZE]
        assert isinstance(size, int) and 1 <= size <= 3
        shared = [f for f in forwards if f.start_time == forward.start_time]
        assert len(shared) == size


async def test_invalid_argument_is_the_server_spans_status_code(
    traced: RunningServer, spans: InMemorySpanExporter
) -> None:
    call: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = traced.channel.stream_unary(
        f"/{SERVICE}/Search", request_serializer=lambda frame: frame
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stream(CORRUPT_FRAME))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    root = await server_span(spans, "Search")
    assert root.attributes is not None
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # OpenTelemetry's RPC conventions: a caller's error leaves a server span's status unset (not the server's
    # fault); the stage that refused the request is marked failed.
    assert root.status.status_code == StatusCode.UNSET
    [upload] = children(spans, root)
    assert upload.name == "upload.read"
    assert upload.status.status_code == StatusCode.ERROR


async def test_server_failure_sets_the_error_status_on_the_server_span(
    traced: RunningServer, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(traced.components.store, "get", raising(StoreUnavailable("qdrant is unreachable (injected)")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await traced.stub.GetProduct(pb.GetProductRequest(id="any"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    root = await server_span(spans, "GetProduct")
    assert root.attributes is not None
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert root.status.status_code == StatusCode.ERROR
    assert "StatusCode.UNAVAILABLE" in (root.status.description or "")


async def test_a_trace_started_by_the_caller_is_continued(traced: RunningServer, spans: InMemorySpanExporter) -> None:
    traceparent = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
    query = pb.SearchRequest(query=search_query(text="blue shoes"))
    with structlog.testing.capture_logs(processors=_SHARED_PROCESSORS) as logs:
        await traced.stub.Search(stream(query), metadata=(("traceparent", traceparent),))

    root = await server_span(spans, "Search")
    assert root.context is not None and root.parent is not None
    assert format_trace_id(root.context.trace_id) == CALLER_TRACE_ID
    assert format_span_id(root.parent.span_id) == CALLER_SPAN_ID
    assert root.parent.is_remote
    assert all(s.context is not None and s.context.trace_id == root.context.trace_id for s in children(spans, root))
    # The RPC's log line names the trace and the server span; the span names the line's request id.
    [line] = [entry for entry in logs if entry["event"] == "rpc"]
    assert line["trace_id"] == CALLER_TRACE_ID
    assert line["span_id"] == format_span_id(root.context.span_id)
    assert root.attributes is not None and root.attributes[tracing.REQUEST_ID] == line["request_id"]


async def test_health_checks_are_not_traced(traced: RunningServer, spans: InMemorySpanExporter) -> None:
    from grpc_health.v1 import health_pb2

    await traced.health.Check(health_pb2.HealthCheckRequest())
    await traced.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    await server_span(spans, "GetServiceInfo")
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]


async def test_without_a_provider_no_span_is_recorded_and_logs_have_no_trace_id(running: RunningServer) -> None:
    assert tracing.server_interceptor() is None
    with structlog.testing.capture_logs(processors=_SHARED_PROCESSORS) as logs:
        await running.stub.Search(stream(pb.SearchRequest(query=search_query(text="red mug"))))
    [line] = [entry for entry in logs if entry["event"] == "rpc"]
    assert "trace_id" not in line
    with tracing.tracer.start_as_current_span("stage") as span:
        assert not span.get_span_context().is_valid


@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        pytest.param({}, None, id="nothing-set"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp", id="endpoint"),
        pytest.param({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "otlp", id="traces-endpoint"),
        pytest.param({"OTEL_TRACES_EXPORTER": "console"}, "console", id="console"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None, id="none"),
        pytest.param(
            {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None, id="disabled"
        ),
        pytest.param({"OTEL_SERVICE_NAME": "imagesearch"}, None, id="service-name-only"),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_configured(
    environ: dict[str, str], exporter: str | None
) -> None:
    assert tracing.requested_exporter(environ) == exporter


def test_start_installs_a_provider_and_stop_removes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "search-eu")
    provider = tracing.start({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "search-eu"})
    try:
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "search-eu"
        assert tracing.server_interceptor() is not None
        assert tracing.tracer.enabled
    finally:
        tracing.stop()
    assert not tracing.tracer.enabled and tracing.server_interceptor() is None


def test_start_refuses_an_unsupported_exporter_without_failing() -> None:
    assert tracing.start({"OTEL_TRACES_EXPORTER": "zipkin"}) is None
    assert (
        tracing.start({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        is None
    )
    assert not tracing.tracer.enabled


def test_start_without_the_extra_warns_and_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if `imagesearch[tracing]` were not installed: the instrumentation cannot be imported.
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.grpc", None)
    with structlog.testing.capture_logs() as logs:
        assert tracing.start({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) is None
    [line] = logs
    assert line["log_level"] == "warning" and line["install"] == tracing.INSTALL_HINT
    assert not tracing.tracer.enabled


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as an OpenTelemetry Collector or Jaeger would be."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[str, _Collector]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    receiver = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(None)


def test_serve_exports_spans_over_otlp_and_logs_their_trace_id(
    tmp_path: Path, collector: tuple[str, _Collector]
) -> None:
    # A real `imagesearch serve` process, configured by OpenTelemetry's variables only: its spans reach an OTLP/gRPC
    # receiver (the last ones when it stops), and its JSON rpc line names the trace the caller started.
    endpoint, receiver = collector
    port = free_port()
    process = serve_process(
        tmp_path,
        port,
        IMAGESEARCH_LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_SERVICE_NAME="imagesearch-e2e",
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=120, wait_for_ready=True)
            search = channel.stream_unary(
                f"/{SERVICE}/Search",
                request_serializer=pb.SearchRequest.SerializeToString,
                response_deserializer=pb.SearchResponse.FromString,
            )
            traceparent = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
            query = pb.SearchRequest(query=search_query(text="red mug"))
            search(iter([query]), metadata=(("traceparent", traceparent),))
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=120)
    records = [json.loads(line) for line in stderr.decode().splitlines()]
    [on] = [r for r in records if r.get("event") == "tracing on"]
    assert on["service_name"] == "imagesearch-e2e" and on["exporter"] == f"otlp {endpoint}"
    [line] = [r for r in records if r.get("event") == "rpc" and r.get("method", "").endswith("/Search")]
    assert line["trace_id"] == CALLER_TRACE_ID

    exported = [
        (resource.resource, span)
        for request in receiver.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    server = [span for _, span in exported if span.name == f"/{SERVICE}/Search"]
    assert len(server) == 1 and server[0].trace_id.hex() == CALLER_TRACE_ID
    assert server[0].span_id.hex() == line["span_id"]
    assert {"upload.read", "model.forward", "store.search"} <= {span.name for _, span in exported}
    services = {a.value.string_value for r, _ in exported for a in r.attributes if a.key == "service.name"}
    assert services == {"imagesearch-e2e"}


# --- the HTTP/JSON port ---------------------------------------------------------------------------------------


async def test_http_calls_have_the_same_server_span_as_grpc_calls(
    spans: InMemorySpanExporter, settings: Settings, encoder: ClipEncoder
) -> None:
    from test_http import serving  # the HTTP tests' server with both ports

    async with serving(settings, encoder) as running:  # built after `spans` installed the provider
        traceparent = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
        response = await running.call(
            "SearchInline", {"query": {"text": "blue shoes"}}, headers={"traceparent": traceparent}
        )
        assert response.status_code == 200
        root = await server_span(spans, "SearchInline")
        assert root.context is not None and root.parent is not None and root.parent.is_remote
        assert format_trace_id(root.context.trace_id) == CALLER_TRACE_ID
        assert format_span_id(root.parent.span_id) == CALLER_SPAN_ID
        assert root.attributes is not None
        assert root.attributes["rpc.system"] == "connect_rpc"
        assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert root.attributes[tracing.REQUEST_ID] == response.headers["x-request-id"]
        assert {"model.forward", "store.search"} <= set(names(children(spans, root)))

        # A caller's error leaves the status unset, a server fault sets it, as on the gRPC port.
        assert (await running.call("GetProduct", {"id": "missing"})).status_code == 404
        missing = await server_span(spans, "GetProduct")
        assert missing.attributes is not None
        assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert missing.status.status_code == StatusCode.UNSET
        spans.clear()

        running.components.store.get = raising(StoreUnavailable("qdrant is unreachable (injected)"))  # type: ignore[method-assign]
        assert (await running.call("GetProduct", {"id": "any"})).status_code == 503
        failed = await server_span(spans, "GetProduct")
        assert failed.status.status_code == StatusCode.ERROR
        assert "StatusCode.UNAVAILABLE" in (failed.status.description or "")

        health = await running.http.post("/grpc.health.v1.Health/Check", json={})
        assert health.status_code == 200
        assert not [s for s in spans.get_finished_spans() if "Health" in s.name]
