"""Server interceptors. Order matters and is set in server.py."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import structlog
from opentelemetry import trace

from imagesearch import tracing
from imagesearch.metrics import Metrics

log = structlog.get_logger("imagesearch.rpc")

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID_CHARS = 128


class RequestLoggingInterceptor(grpc.aio.ServerInterceptor):
    """Binds request_id (the caller's x-request-id, or a fresh one) and method to structlog's context for the
    whole RPC, echoes the id back in the response metadata, logs one line per RPC with status and time, and
    records the same in the metrics."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = str(metadata.get(REQUEST_ID_HEADER, ""))[:_MAX_REQUEST_ID_CHARS] or uuid.uuid4().hex
        return with_behaviour(
            handler,
            single=_wrap(_behaviour(handler), method, request_id, self._metrics),
            streaming=_wrap_streaming(_behaviour(handler), method, request_id, self._metrics),
        )


Behaviour = Callable[..., Any]


def _behaviour(handler: grpc.RpcMethodHandler[Any, Any]) -> Behaviour:
    behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    assert behaviour is not None
    return behaviour


def with_behaviour(
    handler: grpc.RpcMethodHandler[Any, Any], *, single: Behaviour, streaming: Behaviour
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and (de)serializers as `handler`, running `single` for RPCs with one response
    and `streaming` for RPCs with a response stream. Interceptors use it to wrap or replace a method's code."""
    codecs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(single, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(single, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **codecs)
    return grpc.stream_stream_rpc_method_handler(streaming, **codecs)


def _wrap(
    behaviour: Callable[..., Awaitable[Any]], method: str, request_id: str, metrics: Metrics | None
) -> Callable[..., Awaitable[Any]]:
    async def logged(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _logged_rpc(context, method, request_id, metrics):
            response = await behaviour(request, context)
            await _echo_request_id(context, request_id)
            return response

    return logged


def _wrap_streaming(
    behaviour: Callable[..., Any], method: str, request_id: str, metrics: Metrics | None
) -> Callable[..., AsyncIterator[Any]]:
    async def logged(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        with _logged_rpc(context, method, request_id, metrics):
            result = behaviour(request, context)
            if not hasattr(result, "__aiter__"):
                await result  # a handler that writes with context.write() (e.g. health Watch)
                return
            echoed = False
            async for response in result:
                if not echoed:
                    await _echo_request_id(context, request_id)
                    echoed = True
                yield response

    return logged


@contextlib.contextmanager
def _logged_rpc(
    context: grpc.aio.ServicerContext[Any, Any], method: str, request_id: str, metrics: Metrics | None
) -> Iterator[None]:
    """The RPC's log context while it runs; one log line and the metrics when it ends, however it ends."""
    started = _begin(method, request_id)
    code = grpc.StatusCode.OK
    try:
        yield
    except BaseException:
        code = _failure_code(context)
        raise
    finally:
        _end(code, started, method, metrics)


def _begin(method: str, request_id: str) -> float:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
    # The server span (tracing on) names the request id, as the log line names the trace id.
    trace.get_current_span().set_attribute(tracing.REQUEST_ID, request_id)
    return time.perf_counter()


async def _echo_request_id(context: grpc.aio.ServicerContext[Any, Any], request_id: str) -> None:
    # Only with the first response: headers sent earlier would commit the call, and gRPC clients do not retry
    # a committed call (a store outage answered with UNAVAILABLE could then not be retried transparently).
    # Errors carry the id in their trailing metadata instead (service._abort).
    await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))


def _failure_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    # An exception with no status set means the RPC was cancelled (client gone, server stopping).
    return grpc.StatusCode.CANCELLED if code in (None, grpc.StatusCode.OK) else code


def _end(code: grpc.StatusCode, started: float, method: str, metrics: Metrics | None) -> None:
    elapsed_s = time.perf_counter() - started
    if metrics is not None:
        metrics.observe_rpc(method, code.name, elapsed_s)
    elapsed_ms = round(elapsed_s * 1000.0, 2)
    level = "warning" if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else "info"
    getattr(log, level)("rpc", code=code.name, duration_ms=elapsed_ms)
    structlog.contextvars.clear_contextvars()
