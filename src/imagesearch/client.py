"""A small typed asyncio client over the generated stubs. Streams images in chunks for the caller.

async with ImageSearchClient("localhost:50051") as client:
    response = await client.search(text="red mug", top_k=5)
    for hit in response.hits:
        print(hit.score, hit.product.id)
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

# The size the service recommends; well under gRPC's default 4 MiB message limit.
CHUNK_BYTES = 64 * 1024
Product = products_pb2.Product
M = TypeVar("M")
T = TypeVar("T")


# Calls that are safe to repeat are retried by gRPC itself on UNAVAILABLE (server restarting, store outage), with
# exponential backoff. IndexProduct is an upsert, so a retry cannot duplicate a product. DeleteProduct is not
# retried: a retry after a delete that did happen would report NOT_FOUND.
_SERVICE = "imagesearch.v1.ImageSearchService"
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": _SERVICE, "method": m}
                for m in ("Search", "GetProduct", "GetServiceInfo", "IndexProduct", "ListProducts")
            ]
            + [{"service": "grpc.health.v1.Health", "method": "Check"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class _Default(enum.Enum):
    TIMEOUT = enum.auto()


#: A call's `timeout_s` when not given: the client's own.
CLIENT_TIMEOUT = _Default.TIMEOUT
Timeout = float | None | _Default


class ImageSearchClient:
    """asyncio client. `timeout_s` is the deadline of each call (None: no deadline), unless a call passes its
    own `timeout_s`; `credentials` for TLS; `api_key` is sent as `authorization: Bearer KEY`."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        options = [("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = pb_grpc.ImageSearchServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> ImageSearchClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def search(
        self, *, image: bytes | None = None, timeout_s: Timeout = CLIENT_TIMEOUT, **query: Any
    ) -> pb.SearchResponse:
        """Search. `image` is streamed in chunks; every other keyword goes to `search_query`."""
        messages = _stream(
            pb.SearchRequest(query=search_query(**query)), image, lambda c: pb.SearchRequest(image_chunk=c)
        )
        response: pb.SearchResponse = await self._stub.Search(
            messages, timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response

    async def index_product(
        self, product: products_pb2.Product, image: bytes, *, timeout_s: Timeout = CLIENT_TIMEOUT
    ) -> pb.IndexProductResponse:
        messages = _stream(
            pb.IndexProductRequest(product=product), image, lambda c: pb.IndexProductRequest(image_chunk=c)
        )
        response: pb.IndexProductResponse = await self._stub.IndexProduct(
            messages, timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response

    async def index_products(
        self,
        items: AsyncIterable[tuple[products_pb2.Product, bytes | None]]
        | Iterable[tuple[products_pb2.Product, bytes | None]],
    ) -> AsyncIterator[pb.IndexProductsResponse]:
        """Bulk import over one IndexProducts stream: one response per product, in order. An item's image may be
        None when the server fetches `product.image_url` itself."""

        async def messages() -> AsyncIterator[pb.IndexProductsRequest]:
            async for item, image in _aiter(items):
                head = pb.IndexProductsRequest(product=item)
                async for message in _stream(head, image, lambda c: pb.IndexProductsRequest(image_chunk=c)):
                    yield message

        # No overall timeout: a bulk import runs as long as its input; flow control paces it.
        async for response in self._stub.IndexProducts(messages(), metadata=self._metadata):
            yield response

    async def get_product(self, product_id: str, *, timeout_s: Timeout = CLIENT_TIMEOUT) -> products_pb2.Product:
        response = await self._stub.GetProduct(
            pb.GetProductRequest(id=product_id), timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response.product

    async def delete_product(self, product_id: str, *, timeout_s: Timeout = CLIENT_TIMEOUT) -> None:
        await self._stub.DeleteProduct(
            pb.DeleteProductRequest(id=product_id), timeout=self._deadline(timeout_s), metadata=self._metadata
        )

    async def service_info(self, *, timeout_s: Timeout = CLIENT_TIMEOUT) -> pb.GetServiceInfoResponse:
        response: pb.GetServiceInfoResponse = await self._stub.GetServiceInfo(
            pb.GetServiceInfoRequest(), timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response

    async def health(self, service: str = "", *, timeout_s: Timeout = CLIENT_TIMEOUT) -> str:
        """The health status name, e.g. "SERVING"."""
        response = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _deadline(self, timeout_s: Timeout) -> float | None:
        return self.timeout_s if isinstance(timeout_s, _Default) else timeout_s


#: `search_query`'s names for the search modes and hybrid fusions.
SEARCH_MODES = {"dense": pb.SEARCH_MODE_DENSE, "hybrid": pb.SEARCH_MODE_HYBRID, "lexical": pb.SEARCH_MODE_LEXICAL}
FUSIONS = {
    "weighted": pb.SearchQuery.HybridSpec.FUSION_WEIGHTED_SCORE,
    "rank": pb.SearchQuery.HybridSpec.FUSION_RECIPROCAL_RANK,
}


def search_query(
    *,
    text: str = "",
    top_k: int = 0,
    categories: Sequence[str] = (),
    price_min: float | None = None,
    price_max: float | None = None,
    attributes: Mapping[str, str] | None = None,
    mode: str | int | None = None,
    fusion: str | int | None = None,
    lexical_weight: float | None = None,
    **fields: Any,
) -> pb.SearchQuery:
    """A SearchQuery with the filter given as flat keywords; other keywords are SearchQuery fields as they are
    (score_threshold, text_weight, like_product_ids, page_size, page_token, group_by, diversity, ...).

    `mode` is "dense", "hybrid" or "lexical" (or a SearchMode value; None: the server's default), `fusion`
    "weighted" or "rank" and `lexical_weight` 0 to 1 (the hybrid_spec of a hybrid search; None: the defaults)."""
    if mode is not None:
        fields["mode"] = SEARCH_MODES[mode] if isinstance(mode, str) else pb.SearchMode.ValueType(mode)
    if fusion is not None or lexical_weight is not None:
        spec = pb.SearchQuery.HybridSpec(lexical_weight=lexical_weight)
        if fusion is not None:
            spec.fusion = (
                FUSIONS[fusion] if isinstance(fusion, str) else pb.SearchQuery.HybridSpec.Fusion.ValueType(fusion)
            )
        fields["hybrid_spec"] = spec
    return pb.SearchQuery(
        text=text,
        top_k=top_k,
        filter=pb.SearchFilter(
            categories=list(categories),
            price_min=price_min,
            price_max=price_max,
            attributes=dict(attributes or {}),
        ),
        **fields,
    )


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _stream(head: M, image: bytes | None, chunk_message: Callable[[bytes], M]) -> AsyncIterator[M]:
    yield head
    if image is not None:
        for start in range(0, len(image), CHUNK_BYTES):
            yield chunk_message(image[start : start + CHUNK_BYTES])
