"""The HTTP/JSON port: every ImageSearchService rpc and the health check over the Connect protocol (unary rpcs as
plain HTTP/1.1 POSTs of JSON, so curl and browsers work; streams and gRPC-Web for Connect clients), served by the
connectrpc library on uvicorn, in this process and on this event loop, beside the gRPC server.

Nothing here re-implements the service. The Connect endpoints are built from the service descriptor, as
`service.add_to_server` registers the gRPC ones, and call the same `ImageSearchService` methods and the same
health servicer. Only the transport's edge differs, and it follows the gRPC port's rules:
- errors: a domain error becomes the google.rpc status the gRPC port sends (`status.status_for`: code, message
  and details such as BadRequest and RetryInfo), written as a Connect error: Connect's HTTP status for the code
  and a JSON body with the code, the message and the details (each base64, with a readable `debug` copy);
- API keys: the `Authorization: Bearer KEY` header, the same keys and scopes (`auth.ApiKeys`), checked
  before the request body is read;
- one log line and the metrics per call, with the caller's x-request-id (or a fresh one) echoed back;
- deadlines: the caller's `connect-timeout-ms` header, enforced by connectrpc (the handler is cancelled);
- TLS: the same certificate, key and client CA settings.
Besides the rpcs: GET /healthz for probes, /openapi.json (generated from the protos by tools/gen_openapi.py) and
/docs (Swagger UI from the swagger-ui-bundle package).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import Token
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
import uvicorn
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from protobuf import Message as ConnectMessage
from protobuf import Registry, message_to_json_value
from protobuf.wkt import Any as AnyMessage
from protobuf.wkt import FileDescriptorSet

from imagesearch import tracing
from imagesearch.api import interceptors
from imagesearch.api.auth import ApiKeys, Need
from imagesearch.api.interceptors import REQUEST_ID_HEADER
from imagesearch.api.service import SERVICE, ImageSearchService
from imagesearch.api.status import status_for
from imagesearch.errors import ImageSearchError, InvalidArgument
from imagesearch.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger(__name__)

HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
# The generated OpenAPI document, packaged beside the generated code (tools/gen_proto.sh).
OPENAPI_RESOURCE = "image_search_service.openapi.json"
# Swagger UI's files that the /docs page loads; nothing else of the package is served.
_DOCS_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "index.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_STREAM_TYPES = {
    (False, False): StreamType.UNARY,
    (True, False): StreamType.CLIENT_STREAM,
    (False, True): StreamType.SERVER_STREAM,
    (True, True): StreamType.BIDI_STREAM,
}
_ENDPOINT_KINDS: dict[StreamType, Callable[..., Any]] = {
    StreamType.UNARY: Endpoint.unary,
    StreamType.CLIENT_STREAM: Endpoint.client_stream,
    StreamType.SERVER_STREAM: Endpoint.server_stream,
    StreamType.BIDI_STREAM: Endpoint.bidi_stream,
}
Asgi = Callable[[Any, Any, Any], Awaitable[None]]


# ---- errors ------------------------------------------------------------------------------------------------------


def connect_error(status: status_pb2.Status) -> ConnectError:
    """The google.rpc.Status the gRPC port would send, as a Connect error: same code, message and details."""
    name = code_pb2.Code.Name(status.code)
    code = Code.CANCELED if name == "CANCELLED" else Code[name]
    return ConnectError(code, status.message, [_detail(detail.type_url, detail.value) for detail in status.details])


def _detail(type_url: str, value: bytes) -> ConnectMessage:
    packed = AnyMessage(type_url=type_url, value=value)
    desc = _detail_types().message(type_url.rpartition("/")[2])
    # Unpacked, connectrpc also writes the detail as JSON ("debug") beside its base64, so curl users can read it.
    unpacked = packed.unpack(desc) if desc is not None else None
    return unpacked if unpacked is not None else packed


def _detail_types() -> Registry:
    return _types(error_details_pb2.DESCRIPTOR)


@functools.cache
def _types(*roots: FileDescriptor) -> Registry:
    """The messages of `roots` and their imports for connectrpc's own protobuf runtime (protobuf-py), from the
    descriptors grpc uses. JSON names are the proto field names, as in the responses."""
    files: dict[str, FileDescriptor] = {}

    def visit(file: FileDescriptor) -> None:
        if file.name not in files:
            for dependency in file.dependencies:
                visit(dependency)
            files[file.name] = file

    for root in roots:
        visit(root)
    protos = descriptor_pb2.FileDescriptorSet(file=[_file_proto(f) for f in files.values()])
    return FileDescriptorSet.from_binary(protos.SerializeToString()).to_registry()


def _file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)

    def name_fields(messages: Any) -> None:
        for message in messages:
            for field in message.field:
                field.json_name = field.name
            name_fields(message.nested_type)

    name_fields(proto.message_type)
    return proto


@contextlib.asynccontextmanager
async def _errors_mapped(on_error: Callable[[ImageSearchError], Awaitable[None]] | None) -> AsyncIterator[None]:
    """The gRPC port's error mapping (status.rpc_behaviour), for Connect."""
    try:
        yield
    except ImageSearchError as exc:
        if on_error is not None:
            await on_error(exc)
        raise connect_error(status_for(exc)) from None
    except (ConnectError, asyncio.CancelledError):
        raise
    except Exception:
        # The traceback goes to the log, under the request id the caller is given; never to the caller.
        log.exception("unhandled error")
        request_id = structlog.contextvars.get_contextvars().get("request_id", "")
        raise ConnectError(Code.INTERNAL, f"internal error; request id {request_id}") from None


class _ServicerContext:
    """What the shared handlers may ask of their context. The ImageSearchService handlers ask nothing of it; the
    health servicer aborts unknown service names."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._ctx = ctx

    def time_remaining(self) -> float | None:
        remaining_ms = self._ctx.timeout_ms
        return None if remaining_ms is None else max(remaining_ms / 1000.0, 0.0)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise connect_error(status_pb2.Status(code=code.value[0], message=details))


# ---- codecs ------------------------------------------------------------------------------------------------------


class JsonCodec:
    """Protobuf JSON with the proto field names (as in the .proto, the error details and grpcurl's output) and
    every field written, defaults included ("created": false), for callers reading plain JSON. Requests accept
    both naming styles; an unknown field is INVALID_ARGUMENT, so a misspelt field is not silently ignored."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        # Written by protobuf-py (connectrpc's own protobuf runtime) from the binary form: 3x faster than
        # google.protobuf's json_format (150 us against 490 us for 10 hits), which is most of the port's cost per
        # search. tests/test_http.py checks both write the same JSON.
        registry = _types(message.DESCRIPTOR.file, error_details_pb2.DESCRIPTOR)
        name = message.DESCRIPTOR.full_name
        desc = registry.message(name)
        assert desc is not None
        mirror = AnyMessage(type_url=f"type.googleapis.com/{name}", value=message.SerializeToString()).unpack(desc)
        assert mirror is not None
        value = message_to_json_value(mirror, registry=registry, always_emit_implicit=True, use_proto_field_name=True)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message)
        except (json_format.ParseError, ValueError) as exc:
            name = message_class.DESCRIPTOR.full_name
            raise connect_error(status_for(InvalidArgument([], f"the request is not a valid {name}: {exc}"))) from None
        return message


# ---- endpoints ---------------------------------------------------------------------------------------------------


def _endpoint(
    method: MethodDescriptor,
    handler: Callable[..., Any],
    on_error: Callable[[ImageSearchError], Awaitable[None]] | None = None,
) -> Any:
    stream_type = _STREAM_TYPES[(method.client_streaming, method.server_streaming)]
    info = MethodInfo(
        name=method.name,
        service_name=method.containing_service.full_name,
        input=message_factory.GetMessageClass(method.input_type),
        output=message_factory.GetMessageClass(method.output_type),
        idempotency_level=(
            IdempotencyLevel.NO_SIDE_EFFECTS
            if method.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
            else IdempotencyLevel.UNKNOWN
        ),
        stream_type=stream_type,
    )
    if method.server_streaming:

        async def streaming(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
            async with _errors_mapped(on_error):
                async for response in handler(request, _ServicerContext(ctx)):
                    yield response

        return _ENDPOINT_KINDS[stream_type](method=info, function=streaming)

    async def single(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        async with _errors_mapped(on_error):
            return await handler(request, _ServicerContext(ctx))

    return _ENDPOINT_KINDS[stream_type](method=info, function=single)


def endpoints(service: ImageSearchService, health_servicer: health.aio.HealthServicer) -> dict[str, Any]:
    """URL path -> Connect endpoint: every method of the service descriptor, on the same handler the gRPC port
    runs, and health's Check (Watch needs a server stream of its own; probes poll /healthz instead)."""
    served = {
        f"/{SERVICE.full_name}/{method.name}": _endpoint(method, getattr(service, method.name), service.on_error)
        for method in SERVICE.methods
    }
    served[f"/{health.SERVICE_NAME}/{HEALTH_CHECK.name}"] = _endpoint(HEALTH_CHECK, health_servicer.Check)
    return served


class _ConnectApp(ConnectASGIApplication[Mapping[str, Any]]):
    @property
    def path(self) -> str:
        return "/"


# ---- per-call edge: request id, log line, metrics, API keys --------------------------------------------------------


def _method_path(ctx: RequestContext[Any, Any]) -> str:
    return f"/{ctx.method.service_name}/{ctx.method.name}"


def _grpc_code(error: Exception | None) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    if not isinstance(error, ConnectError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.CANCELLED if error.code is Code.CANCELED else grpc.StatusCode[error.code.name]


_Started = tuple[trace.Span, "Token[otel_context.Context]"]


class ServerSpan:
    """The HTTP port's server span, one per call, as the gRPC port's (opentelemetry-instrumentation-grpc): named
    by the method path, kind SERVER, continuing the caller's `traceparent` header, current while the call runs (so
    the stage spans and the call's log lines hang off it), with the gRPC status code the call ended with. Health
    is not traced, as on the gRPC port."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer(tracing.INSTRUMENTATION_NAME)

    async def on_start(self, ctx: RequestContext[Any, Any]) -> _Started | None:
        if ctx.method.service_name in tracing.UNTRACED_SERVICES:
            return None
        parent = propagate.extract(ctx.request_headers)
        span = self._tracer.start_span(
            _method_path(ctx),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "connect_rpc",
                "rpc.service": ctx.method.service_name,
                "rpc.method": ctx.method.name,
            },
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    async def on_end(self, started: _Started | None, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        if started is None:
            return
        span, attached = started
        code = _grpc_code(error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name in tracing.SERVER_FAULTS:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {getattr(error, 'message', error)}"))
        span.end()
        otel_context.detach(attached)


class RequestLog:
    """As the gRPC port's RequestLoggingInterceptor: binds request_id (the caller's x-request-id, or a fresh one)
    and method for every log line of the call, echoes the id in the response headers, and writes one log line and
    the metrics when the call ends."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        caller_id = ctx.request_headers.get(REQUEST_ID_HEADER, "")[: interceptors._MAX_REQUEST_ID_CHARS]
        request_id = caller_id or uuid.uuid4().hex
        started = interceptors._begin(_method_path(ctx), request_id)
        structlog.contextvars.bind_contextvars(transport="http")
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        return started

    async def on_end(self, started: float, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        interceptors._end(_grpc_code(error), started, _method_path(ctx), self._metrics)


class KeyCheck:
    """The gRPC port's API key decision (auth.ApiKeys) on the Authorization header, before the request body is
    read: the same keys, scopes, refusals and messages. Health and the documents are open unless `protect_all`,
    as health and reflection are on the gRPC port."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        method = _method_path(ctx)
        self._check(self._keys.needed(method), ctx.request_headers.get("authorization"), method)

    async def on_end(self, token: None, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        return

    def check_document(self, authorization: str | None, path: str) -> None:
        self._check("read" if self._keys.protect_all else "open", authorization, path)

    def _check(self, needed: Need, authorization: str | None, method: str) -> None:
        refusal = self._keys.refusal(needed, authorization, method)
        if refusal is not None:
            raise ConnectError(Code[refusal.code.name], refusal.message)


# ---- the ASGI application ----------------------------------------------------------------------------------------


class HttpApp:
    """Routes GET /healthz, /openapi.json and /docs; everything else goes to the Connect application."""

    def __init__(self, connect: Asgi, health_servicer: health.aio.HealthServicer, api_keys: KeyCheck | None) -> None:
        self._connect = connect
        self._health = health_servicer
        self._api_keys = api_keys

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            page = self._page(path)
            if page is not None:
                headers: tuple[tuple[bytes, bytes], ...] = ()
                try:
                    if self._api_keys is not None:
                        self._api_keys.check_document(_header(scope, b"authorization"), path)
                    status, content_type, body = await page()
                except ConnectError as exc:  # a refused key, in Connect's error shape
                    status, content_type = _CONNECT_HTTP_STATUS[exc.code], "application/json"
                    body = json.dumps({"code": exc.code.value, "message": exc.message}).encode()
                except _Redirect as redirect:
                    status, content_type, body = 308, "text/plain", b""
                    headers = ((b"location", redirect.location.encode()),)
                await _respond(send, status, content_type, b"" if scope["method"] == "HEAD" else body, headers)
                return
        await self._connect(scope, receive, send)

    def _page(self, path: str) -> Callable[[], Awaitable[tuple[int, str, bytes]]] | None:
        if path == "/healthz":
            return self._healthz
        if path == "/openapi.json":
            return _openapi
        if path == "/docs":
            return _docs_redirect
        if path.startswith("/docs/"):
            name = path.removeprefix("/docs/") or "index.html"
            if name == "index.html":
                return _docs_page
            if name in _DOCS_ASSETS:
                return functools.partial(_docs_asset, name)
        return None

    async def _healthz(self) -> tuple[int, str, bytes]:
        """The whole server's grpc.health.v1 status, for HTTP probes: 200 while SERVING, 503 otherwise (store
        unreachable, or draining)."""
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=""), None)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        status = 200 if response.status == health_pb2.HealthCheckResponse.SERVING else 503
        return status, "application/json", json.dumps({"status": name}).encode()


_CONNECT_HTTP_STATUS = {Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403}


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _respond(
    send: Any, status: int, content_type: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _openapi() -> tuple[int, str, bytes]:
    return 200, "application/json", _openapi_document()


@functools.cache
def _openapi_document() -> bytes:
    return (importlib.resources.files("imagesearch.v1") / OPENAPI_RESOURCE).read_bytes()


async def _docs_redirect() -> tuple[int, str, bytes]:
    # The page's assets are relative to /docs/.
    raise _Redirect("/docs/")


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


async def _docs_page() -> tuple[int, str, bytes]:
    return 200, "text/html; charset=utf-8", _docs_html()


async def _docs_asset(name: str) -> tuple[int, str, bytes]:
    return 200, _DOCS_ASSETS[name], _docs_file(name)


@functools.cache
def _docs_html() -> bytes:
    import jinja2

    template = (_swagger_ui_path() / "index.j2").read_text()
    # Relative, so the page still finds the document behind a proxy that serves this port under a prefix.
    return jinja2.Template(template).render(openapi_spec_url="../openapi.json").encode()


@functools.cache
def _docs_file(name: str) -> bytes:
    return (_swagger_ui_path() / name).read_bytes()


def _swagger_ui_path() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def build_app(
    service: ImageSearchService,
    health_servicer: health.aio.HealthServicer,
    *,
    metrics: Metrics | None = None,
    api_keys: ApiKeys | None = None,
    max_request_bytes: int,
) -> HttpApp:
    key_check = KeyCheck(api_keys) if api_keys is not None else None
    chain: list[Any] = [RequestLog(metrics)]  # first: the refusals of the key check are logged with the request id
    provider = tracing.installed_provider()
    if provider is not None:
        # Before the log line's interceptor: the span is current when the request id is bound to it.
        chain.insert(0, ServerSpan(provider))
    if key_check is not None:
        chain.append(key_check)
    connect = _ConnectApp(
        service=endpoints(service, health_servicer),
        endpoints=lambda served: served,
        # Metadata interceptors at the front of the list run before the request body is read.
        interceptors=chain,
        read_max_bytes=max_request_bytes,
        codecs=[google_protobuf_binary_codec(), JsonCodec()],
    )
    return HttpApp(connect, health_servicer, key_check)


# ---- the listener ------------------------------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving the HTTP application on the running event loop, started and stopped with the gRPC server:
    not uvicorn's own serve(), which would install its own signal handlers over the server's."""

    def __init__(self, app: HttpApp, sock: socket.socket, tls: TlsFiles | None) -> None:
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            app,
            lifespan="off",
            interface="asgi3",
            ws="none",
            # The service's own log line per call (RequestLog) replaces the access log; uvicorn's start and stop
            # lines would repeat the server's.
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            ssl_ca_certs=tls.client_ca_file if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._sock])
        # uvicorn's loop that refreshes the Date header each second and returns once should_exit is set.
        self._ticks = asyncio.create_task(self._server.main_loop())

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish within `grace_s`, then cancel the rest."""
        if grace_s <= 0:
            self.force_exit()
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        # None once forced: nothing is left to wait for (uvicorn would report a timeout of 0 as exceeded).
        self._server.config.timeout_graceful_shutdown = grace_s if grace_s > 0 else None  # type: ignore[assignment]
        await self._server.shutdown(sockets=[self._sock])

    def force_exit(self) -> None:
        """Cut a stop() in progress short: cancel the requests still in flight."""
        self._server.force_exit = True
        for task in self._server.server_state.tasks:
            task.cancel()


class TlsFiles:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.client_ca_file = str(client_ca_file) if client_ca_file else None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port. "[::]" (the default host) is one dual-stack socket on every address, as
    for the gRPC port; asyncio would bind IPv6 only for "::"."""
    host = host.strip("[]")
    if host in ("::", ""):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address: tuple[Any, ...] = ("::", port)
        except OSError:  # no IPv6 here
            sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
