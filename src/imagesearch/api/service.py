"""gRPC handlers for imagesearch.v1.ImageSearchService: read the stream, convert proto -> domain, apply the request
rules, call the catalogue, convert back. Parsing, deadlines and error mapping wrap every handler alike
(status.rpc_behaviour), registered from the service descriptor by `add_to_server`."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from google.protobuf import message_factory

from imagesearch.api.admission import Admission
from imagesearch.api.convert import (
    duplicates_request_from_proto,
    duplicates_to_proto,
    list_request_from_proto,
    outcome_to_proto,
    product_to_proto,
    query_from_proto,
    service_info_to_proto,
)
from imagesearch.api.health import StoreHealth
from imagesearch.api.status import rpc_behaviour, status_for
from imagesearch.api.streams import (
    StreamedRequest,
    as_stream,
    inline_image_errors,
    product_request,
    read_bulk_stream,
    read_stream,
)
from imagesearch.config import Settings
from imagesearch.errors import ImageSearchError, InvalidArgument, StoreUnavailable
from imagesearch.ranking import RankingSpec
from imagesearch.search import validation
from imagesearch.search.bulk import index_many
from imagesearch.search.catalog import Catalog
from imagesearch.search.duplicates import find_duplicates
from imagesearch.tracing import IMAGE_BYTES, tracer
from imagesearch.v1 import image_search_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ImageSearchService"]
Context = grpc.aio.ServicerContext[Any, Any]


def server_version() -> str:
    try:
        return version("imagesearch")
    except PackageNotFoundError:
        return "0+unknown"


class ImageSearchService:
    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        store_health: StoreHealth | None = None,
        default_ranking: RankingSpec | None = None,
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.store_health = store_health
        self.admission = Admission(settings.max_concurrent_requests)
        # The server's rules (IMAGESEARCH_RANKING_RULES_FILE) for searches that send none.
        self.default_ranking = default_ranking

    async def on_error(self, exc: ImageSearchError) -> None:
        if isinstance(exc, StoreUnavailable) and self.store_health is not None:
            await self.store_health.store_failed(exc)

    async def Search(self, requests: AsyncIterable[pb.SearchRequest], context: Context) -> pb.SearchResponse:
        with self.admission.slot():
            streamed = await self._read_upload(requests, "query")
            sent = query_from_proto(streamed.head, streamed.image)
            query = validation.search_query(sent, self.settings, self.default_ranking)
            if sent.ranking is not None and query.ranking is not None:
                # The caller's own rules name attributes of this catalogue (the server's default may name
                # attributes that products gain later).
                await self.catalog.check_rule_fields(query.ranking, "query.ranking")
            return outcome_to_proto(await self.catalog.search(query))

    async def IndexProduct(
        self, requests: AsyncIterable[pb.IndexProductRequest], context: Context
    ) -> pb.IndexProductResponse:
        with self.admission.slot():
            streamed = await self._read_upload(requests, "product")
            product, uploads, violations = product_request(
                streamed.head, streamed.images, self.settings, self.catalog.fetches_urls
            )
            if violations:
                raise InvalidArgument(violations)
            stored, created = await self.catalog.index(product, uploads)
        return pb.IndexProductResponse(product=product_to_proto(stored), created=created)

    async def IndexProducts(
        self, requests: AsyncIterable[pb.IndexProductsRequest], context: Context
    ) -> AsyncIterator[pb.IndexProductsResponse]:
        with self.admission.slot():
            items = read_bulk_stream(requests, self.settings, self.catalog.fetches_urls)
            async for result in index_many(self.catalog, items):
                if isinstance(result.error, StoreUnavailable):
                    await self.on_error(result.error)
                yield pb.IndexProductsResponse(
                    id=result.product_id,
                    position=result.position,
                    created=result.created,
                    error=status_for(result.error) if result.error is not None else None,
                )

    async def _read_upload(self, requests: AsyncIterable[Any], head_field: str) -> StreamedRequest:
        with tracer.start_as_current_span("upload.read") as span:
            streamed = await read_stream(requests, head_field, self.settings)
            if streamed.images:
                span.set_attribute(IMAGE_BYTES, sum(len(image) for image in streamed.images.values()))
        return streamed

    async def GetProduct(self, request: pb.GetProductRequest, context: Context) -> pb.GetProductResponse:
        validation.check_id(request.id)
        return pb.GetProductResponse(product=product_to_proto(await self.catalog.get(request.id)))

    async def DeleteProduct(self, request: pb.DeleteProductRequest, context: Context) -> pb.DeleteProductResponse:
        validation.check_id(request.id)
        await self.catalog.delete(request.id)
        return pb.DeleteProductResponse()

    async def ListProducts(self, request: pb.ListProductsRequest, context: Context) -> pb.ListProductsResponse:
        flt, page_size, page = validation.list_request(list_request_from_proto(request))
        listed = await self.catalog.list_products(flt, page_size, page)
        return pb.ListProductsResponse(
            products=[product_to_proto(p) for p in listed.products], next_page_token=listed.next_page_token
        )

    async def GetServiceInfo(self, request: pb.GetServiceInfoRequest, context: Context) -> pb.GetServiceInfoResponse:
        return service_info_to_proto(await self.catalog.describe(), self.settings, server_version())

    async def FindDuplicates(self, request: pb.FindDuplicatesRequest, context: Context) -> pb.FindDuplicatesResponse:
        checked, page = validation.duplicates_request(duplicates_request_from_proto(request))
        return duplicates_to_proto(await find_duplicates(self.catalog, checked, page))

    # The unary forms run the streaming handlers on their request split into the stream those take, so both forms
    # share admission, limits, rules and errors.

    async def SearchInline(self, request: pb.SearchInlineRequest, context: Context) -> pb.SearchInlineResponse:
        requests = as_stream(request, "query", pb.SearchRequest, self.settings.max_chunk_bytes)
        with inline_image_errors():
            response = await self.Search(requests, context)
        # The same field names and numbers (tests/test_http.py checks), so the bytes of one are the other.
        return pb.SearchInlineResponse.FromString(response.SerializeToString())

    async def IndexProductInline(
        self, request: pb.IndexProductInlineRequest, context: Context
    ) -> pb.IndexProductInlineResponse:
        requests = as_stream(request, "product", pb.IndexProductRequest, self.settings.max_chunk_bytes)
        with inline_image_errors():
            response = await self.IndexProduct(requests, context)
        return pb.IndexProductInlineResponse(product=response.product, created=response.created)


def method_handlers(service: ImageSearchService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A handler for every method of the service descriptor, each wrapped by `rpc_behaviour`. Requests reach it
    as raw bytes (no request_deserializer), so that rpc_behaviour parses them and a corrupt frame is the caller's
    INVALID_ARGUMENT."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        behaviour = rpc_behaviour(
            getattr(service, method.name),
            message_factory.GetMessageClass(method.input_type),
            client_streaming=method.client_streaming,
            on_error=service.on_error,
        )
        serializer = message_factory.GetMessageClass(method.output_type).SerializeToString
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(behaviour, response_serializer=serializer)
    return handlers


def add_to_server(service: ImageSearchService, server: grpc.aio.Server) -> None:
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    # Registered methods skip grpc's per-call lookup through the generic handlers.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
