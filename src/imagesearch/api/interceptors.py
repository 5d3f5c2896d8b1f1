"""The gRPC port's server interceptors: the call edge (call_edge.py) around every RPC. Their order is set, and
commented, in server.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias

import grpc

from imagesearch.api import call_edge
from imagesearch.metrics import Metrics

# Strings: grpc's classes are generic to the type checker only.
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What an interceptor is handed to reach the next one (and, last, the method's handler).
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]]"
Behaviour = Callable[..., Any]


class RequestLoggingInterceptor(grpc.aio.ServerInterceptor):
    """The call edge of every RPC: binds request_id (the caller's x-request-id, or a fresh one) and method to
    structlog's context for the whole RPC, echoes the id back in the response metadata, logs one line per RPC with
    status and time, and records the same in the metrics."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = call_edge.request_id_from(str(metadata.get(call_edge.REQUEST_ID_HEADER, "")))
        return with_behaviour(
            handler,
            single=_wrap(_behaviour(handler), method, request_id, self._metrics),
            streaming=_wrap_streaming(_behaviour(handler), method, request_id, self._metrics),
        )


def _behaviour(handler: MethodHandler) -> Behaviour:
    behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    assert behaviour is not None
    return behaviour


def with_behaviour(handler: MethodHandler, *, single: Behaviour, streaming: Behaviour) -> MethodHandler:
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
    call = call_edge.begin(method, request_id)
    code = grpc.StatusCode.OK
    try:
        yield
    except BaseException:
        code = _failure_code(context)
        raise
    finally:
        call_edge.end(call, code, metrics)


async def _echo_request_id(context: grpc.aio.ServicerContext[Any, Any], request_id: str) -> None:
    # Only with the first response: headers sent earlier would commit the call, and gRPC clients do not retry
    # a committed call (a store outage answered with UNAVAILABLE could then not be retried transparently).
    # Errors carry the id in their trailing metadata instead (status.errors_mapped).
    await context.send_initial_metadata(((call_edge.REQUEST_ID_HEADER, request_id),))


def _failure_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    # An exception with no status set means the RPC was cancelled (client gone, server stopping).
    return grpc.StatusCode.CANCELLED if code in (None, grpc.StatusCode.OK) else code
