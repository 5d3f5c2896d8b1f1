"""The HTTP port's ASGI application: the Connect endpoints behind the call's edge, and the pages beside them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.server import ConnectASGIApplication
from grpc_health.v1 import health

from imagesearch import tracing
from imagesearch.api.auth import ApiKeys
from imagesearch.api.http.codec import JsonCodec
from imagesearch.api.http.edge import KeyCheck, RequestLog, ServerSpan
from imagesearch.api.http.endpoints import endpoints
from imagesearch.api.http.pages import HttpApp
from imagesearch.api.service import ImageSearchService
from imagesearch.metrics import Metrics


class _ConnectApp(ConnectASGIApplication[Mapping[str, Any]]):
    @property
    def path(self) -> str:
        return "/"


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
