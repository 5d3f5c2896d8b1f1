"""A small typed asyncio client over the generated stubs. Streams images in chunks for the caller.

async with ImageSearchClient("localhost:50051") as client:
    response = await client.search(text="red mug", top_k=5)
    for hit in response.hits:
        print(hit.score, hit.product.id, hit.matched_image_index)
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias, TypedDict, TypeVar, Unpack

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2

# The size the service recommends; well under gRPC's default 4 MiB message limit.
CHUNK_BYTES = 64 * 1024
Product = products_pb2.Product
ProductImage = products_pb2.ProductImage
M = TypeVar("M")
T = TypeVar("T")

#: The bytes of one product's images for `index_products`: one image (bytes), several (a list aligned with
#: `product.images`, None or b"" where the server fetches the entry's url instead), or None (no bytes at all: the
#: server fetches `product.image_url` or each entry's url).
ProductImages: TypeAlias = bytes | Sequence[bytes | None] | None
#: A query region: a NormalizedBox, or its (x0, y0, x1, y1) in fractions of the image's width and height.
Region: TypeAlias = pb.NormalizedBox | tuple[float, float, float, float]
#: Ranking rules: a RankingSpec, or the same in proto3 JSON as a dict (`{"rules": [{"field": "popularity", ...}]}`).
Ranking: TypeAlias = pb.RankingSpec | Mapping[str, Any]


# Calls that are safe to repeat are retried by gRPC itself on UNAVAILABLE (server restarting, store outage), with
# exponential backoff. IndexProduct is an upsert, so a retry cannot duplicate a product; FindDuplicates only reads.
# DeleteProduct is not retried: a retry after a delete that did happen would report NOT_FOUND.
_SERVICE = "imagesearch.v1.ImageSearchService"
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": _SERVICE, "method": m}
                for m in ("Search", "GetProduct", "GetServiceInfo", "IndexProduct", "ListProducts", "FindDuplicates")
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


class DuplicateOptions(TypedDict, total=False):
    """The options of `find_duplicates` and `all_duplicates` besides the product and the page: the filter (as in
    `search`), the threshold, products per page and the deadline of each call."""

    categories: Sequence[str]
    price_min: float | None
    price_max: float | None
    attributes: Mapping[str, str] | None
    threshold: float | None
    page_size: int
    timeout_s: Timeout


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
        """Search. `image` is streamed in chunks; every other keyword goes to `search_query`: text, the filter,
        mode, regions, collapse_duplicates, duplicate_threshold, ranking, explain and any SearchQuery field."""
        messages = _stream(
            pb.SearchRequest(query=search_query(**query)), image, lambda c: pb.SearchRequest(image_chunk=c)
        )
        response: pb.SearchResponse = await self._stub.Search(
            messages, timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response

    async def index_product(
        self,
        product: products_pb2.Product,
        image: bytes | None = None,
        *,
        images: Sequence[bytes | None] | None = None,
        timeout_s: Timeout = CLIENT_TIMEOUT,
    ) -> pb.IndexProductResponse:
        """Index (upsert) one product. `image`: its one image, streamed in chunks. `images`: the bytes of several,
        aligned with `product.images` (entry i is streamed after an `image_index` i message; None or b"" sends
        none, and the server fetches that entry's url). Neither: the server fetches `product.image_url`."""
        messages = _product_stream(
            product,
            _images_to_send(product, image, images),
            lambda p: pb.IndexProductRequest(product=p),
            lambda i: pb.IndexProductRequest(image_index=i),
            lambda c: pb.IndexProductRequest(image_chunk=c),
        )
        response: pb.IndexProductResponse = await self._stub.IndexProduct(
            messages, timeout=self._deadline(timeout_s), metadata=self._metadata
        )
        return response

    async def index_products(
        self,
        items: AsyncIterable[tuple[products_pb2.Product, ProductImages]]
        | Iterable[tuple[products_pb2.Product, ProductImages]],
    ) -> AsyncIterator[pb.IndexProductsResponse]:
        """Bulk import over one IndexProducts stream: one response per product, in order. An item is a product
        and its image bytes: bytes for one image, a list aligned with `product.images` for several (see
        `index_product`), or None when the server fetches the images' URLs itself."""

        async def messages() -> AsyncIterator[pb.IndexProductsRequest]:
            async for item, data in _aiter(items):
                # Sent as given: a product whose images do not fit its description gets its own error response
                # from the server, and the rest of the stream goes on.
                to_send = data if isinstance(data, bytes) or data is None else [(i, b) for i, b in enumerate(data) if b]
                async for message in _product_stream(
                    item,
                    to_send,
                    lambda p: pb.IndexProductsRequest(product=p),
                    lambda i: pb.IndexProductsRequest(image_index=i),
                    lambda c: pb.IndexProductsRequest(image_chunk=c),
                ):
                    yield message

        # No overall timeout: a bulk import runs as long as its input; flow control paces it.
        async for response in self._stub.IndexProducts(messages(), metadata=self._metadata):
            yield response

    async def find_duplicates(
        self, *, product_id: str = "", page_token: str = "", **options: Unpack[DuplicateOptions]
    ) -> pb.FindDuplicatesResponse:
        """One FindDuplicates call: `product_id`'s near-duplicate listings, or (without it) those of the next
        `page_size` products the filter admits, from `page_token` on. `threshold`: the cosine similarity at or
        above which two images are near copies, (0, 1]; None: the server's default (0.94)."""
        request = pb.FindDuplicatesRequest(
            product_id=product_id,
            filter=search_filter(
                options.get("categories", ()),
                options.get("price_min"),
                options.get("price_max"),
                options.get("attributes"),
            ),
            threshold=options.get("threshold"),
            page_size=options.get("page_size", 0),
            page_token=page_token,
        )
        response: pb.FindDuplicatesResponse = await self._stub.FindDuplicates(
            request, timeout=self._deadline(options.get("timeout_s", CLIENT_TIMEOUT)), metadata=self._metadata
        )
        return response

    async def all_duplicates(self, **options: Unpack[DuplicateOptions]) -> AsyncIterator[pb.ProductDuplicates]:
        """Every product the filter admits that has near-duplicates, with them: `find_duplicates` page after page
        until the last (`timeout_s` bounds each page, not the whole walk)."""
        token = ""
        while True:
            page = await self.find_duplicates(page_token=token, **options)
            for entry in page.products:
                yield entry
            token = page.next_page_token
            if not token:
                return

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
    regions: Sequence[Region] = (),
    collapse_duplicates: bool = False,
    duplicate_threshold: float | None = None,
    ranking: Ranking | None = None,
    explain: bool = False,
    **fields: Any,
) -> pb.SearchQuery:
    """A SearchQuery with the filter given as flat keywords; other keywords are SearchQuery fields as they are
    (score_threshold, text_weight, like_product_ids, page_size, page_token, group_by, diversity, ...).

    `mode` is "dense", "hybrid" or "lexical" (or a SearchMode value; None: the server's default), `fusion`
    "weighted" or "rank" and `lexical_weight` 0 to 1 (the hybrid_spec of a hybrid search; None: the defaults).
    `regions`: boxes of the query image to search for, (x0, y0, x1, y1) in 0..1 each (several: one result list
    per box in `region_results`). `collapse_duplicates` folds near-duplicate listings into the best-ranked one
    (`duplicate_threshold`: their cosine similarity, None: the server's 0.94). `ranking`: business rules, a
    RankingSpec or its proto3 JSON as a dict (None: the server's default rules; an empty spec: none). `explain`:
    each hit's `explanation` (relevance and each rule's part)."""
    if mode is not None:
        fields["mode"] = SEARCH_MODES[mode] if isinstance(mode, str) else pb.SearchMode.ValueType(mode)
    if fusion is not None or lexical_weight is not None:
        spec = pb.SearchQuery.HybridSpec(lexical_weight=lexical_weight)
        if fusion is not None:
            spec.fusion = (
                FUSIONS[fusion] if isinstance(fusion, str) else pb.SearchQuery.HybridSpec.Fusion.ValueType(fusion)
            )
        fields["hybrid_spec"] = spec
    if ranking is not None:
        fields["ranking"] = ranking_spec(ranking)
    return pb.SearchQuery(
        text=text,
        top_k=top_k,
        filter=search_filter(categories, price_min, price_max, attributes),
        regions=[box(region) for region in regions],
        collapse_duplicates=collapse_duplicates,
        duplicate_threshold=duplicate_threshold,
        explain_scores=explain,
        **fields,
    )


def search_filter(
    categories: Sequence[str] = (),
    price_min: float | None = None,
    price_max: float | None = None,
    attributes: Mapping[str, str] | None = None,
) -> pb.SearchFilter:
    """A SearchFilter from flat values (None: that bound unset)."""
    return pb.SearchFilter(
        categories=list(categories), price_min=price_min, price_max=price_max, attributes=dict(attributes or {})
    )


def box(region: Region) -> pb.NormalizedBox:
    """A NormalizedBox from (x0, y0, x1, y1), or the box itself."""
    if isinstance(region, pb.NormalizedBox):
        return region
    x0, y0, x1, y1 = region
    return pb.NormalizedBox(x0=x0, y0=y0, x1=x1, y1=y1)


def ranking_spec(ranking: Ranking) -> pb.RankingSpec:
    """A RankingSpec from itself or its proto3 JSON as a dict (json_format.ParseError on a wrong field)."""
    if isinstance(ranking, pb.RankingSpec):
        return ranking
    return json_format.ParseDict(dict(ranking), pb.RankingSpec())


def load_ranking_spec(path: Path) -> pb.RankingSpec:
    """A RankingSpec from a file in proto3 JSON, the format of the server's IMAGESEARCH_RANKING_RULES_FILE.
    OSError when it cannot be read, json_format.ParseError when it is not such JSON."""
    return json_format.Parse(path.read_text(encoding="utf-8"), pb.RankingSpec())


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _images_to_send(
    product: products_pb2.Product, image: bytes | None, images: Sequence[bytes | None] | None
) -> list[tuple[int, bytes]] | bytes | None:
    """What follows the product message: one image's bytes (no image_index), several as (index, bytes), or
    nothing. Refuses what the server would only refuse later, and what it could not tell from a mistake."""
    if images is None:
        return image
    if image is not None:
        raise ValueError("pass either image (one image) or images (several), not both")
    if len(images) > len(product.images):
        raise ValueError(
            f"images has {len(images)} entries but product.images describes {len(product.images)}: "
            "images[i] are the bytes of product.images[i]"
        )
    return [(i, data) for i, data in enumerate(images) if data]


async def _product_stream(
    product: products_pb2.Product,
    images: list[tuple[int, bytes]] | bytes | None,
    product_message: Callable[[products_pb2.Product], M],
    index_message: Callable[[int], M],
    chunk_message: Callable[[bytes], M],
) -> AsyncIterator[M]:
    yield product_message(product)
    if isinstance(images, bytes):
        for chunk in _chunks(images):
            yield chunk_message(chunk)
        return
    for index, data in images or ():
        yield index_message(index)
        for chunk in _chunks(data):
            yield chunk_message(chunk)


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start : start + CHUNK_BYTES]


async def _stream(head: M, image: bytes | None, chunk_message: Callable[[bytes], M]) -> AsyncIterator[M]:
    yield head
    if image is not None:
        for chunk in _chunks(image):
            yield chunk_message(chunk)
