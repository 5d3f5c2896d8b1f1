"""The Connect endpoints: one for every method of the service descriptor, as `service.add_to_server` registers
the gRPC ones, on the same handler the gRPC port runs, with the same error mapping; and health's Check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import Endpoint
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2

from imagesearch.api.http.codec import connect_error, errors_as_connect
from imagesearch.api.service import SERVICE, ImageSearchService
from imagesearch.errors import ImageSearchError

HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
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


def endpoints(service: ImageSearchService, health_servicer: health.aio.HealthServicer) -> dict[str, Any]:
    """URL path -> Connect endpoint: every method of the service descriptor, on the same handler the gRPC port
    runs, and health's Check (Watch needs a server stream of its own; probes poll /healthz instead)."""
    served = {
        f"/{SERVICE.full_name}/{method.name}": _endpoint(method, getattr(service, method.name), service.on_error)
        for method in SERVICE.methods
    }
    served[f"/{health.SERVICE_NAME}/{HEALTH_CHECK.name}"] = _endpoint(HEALTH_CHECK, health_servicer.Check)
    return served


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
            async with errors_as_connect(on_error):
                async for response in handler(request, _ServicerContext(ctx)):
                    yield response

        return _ENDPOINT_KINDS[stream_type](method=info, function=streaming)

    async def single(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        async with errors_as_connect(on_error):
            return await handler(request, _ServicerContext(ctx))

    return _ENDPOINT_KINDS[stream_type](method=info, function=single)


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
