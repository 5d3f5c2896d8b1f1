"""The HTTP port's edge of every call, as Connect interceptors, doing what the gRPC port's interceptors do: the
server span, the call edge (api/call_edge.py: request id, log line, metrics) and the API key decision. Their
order is set, and commented, in app.py."""

from __future__ import annotations

from contextvars import Token
from typing import TYPE_CHECKING, Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from imagesearch import tracing
from imagesearch.api import call_edge
from imagesearch.api.auth import ApiKeys, Need
from imagesearch.api.http.codec import grpc_code
from imagesearch.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

_Started = tuple[trace.Span, "Token[otel_context.Context]"]


def method_path(ctx: RequestContext[Any, Any]) -> str:
    """The call's method as the gRPC port names it: '/package.Service/Method'."""
    return f"/{ctx.method.service_name}/{ctx.method.name}"


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
            method_path(ctx),
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
        call_edge.span_ended(span, grpc_code(error), str(getattr(error, "message", error)))
        otel_context.detach(attached)


class RequestLog:
    """The call edge, as the gRPC port's RequestLoggingInterceptor: binds request_id (the caller's x-request-id,
    or a fresh one) and method for every log line of the call, echoes the id in the response headers, and writes
    one log line and the metrics when the call ends."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> call_edge.Call:
        request_id = call_edge.request_id_from(ctx.request_headers.get(call_edge.REQUEST_ID_HEADER))
        call = call_edge.begin(method_path(ctx), request_id, transport="http")
        ctx.response_headers[call_edge.REQUEST_ID_HEADER] = request_id
        return call

    async def on_end(self, call: call_edge.Call, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        call_edge.end(call, grpc_code(error), self._metrics)


class KeyCheck:
    """The gRPC port's API key decision (auth.ApiKeys) on the Authorization header, before the request body is
    read: the same keys, scopes, refusals and messages. Health and the documents are open unless `protect_all`,
    as health and reflection are on the gRPC port."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        method = method_path(ctx)
        self._check(self._keys.needed(method), ctx.request_headers.get("authorization"), method)

    async def on_end(self, token: None, ctx: RequestContext[Any, Any], error: Exception | None) -> None:
        return

    def check_document(self, authorization: str | None, path: str) -> None:
        self._check("read" if self._keys.protect_all else "open", authorization, path)

    def _check(self, needed: Need, authorization: str | None, method: str) -> None:
        refusal = self._keys.refusal(needed, authorization, method)
        if refusal is not None:
            raise ConnectError(Code[refusal.code.name], refusal.message)
