"""gRPC handlers for imagesearch.v1.ImageSearchService: validate, convert proto <-> domain, call the catalogue,
convert back, and map domain errors onto status codes (one table, below)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagesearch.bulk import BulkItem, index_many
from imagesearch.catalog import LIST_PAGE_TOKEN_FIELD, SEARCH_PAGE_TOKEN_FIELD, Catalog, Query, UnknownProducts
from imagesearch.config import Settings
from imagesearch.domain import Facets, FacetSpec, Hit, Product, SearchFilter
from imagesearch.errors import (
    DeadlineExceeded,
    FieldViolation,
    ImageSearchError,
    ImageTooLarge,
    InvalidArgument,
    NotFound,
    Overloaded,
    StoreUnavailable,
)
from imagesearch.health import StoreHealth
from imagesearch.interceptors import REQUEST_ID_HEADER
from imagesearch.paging import ListPage, SearchPage, decode_list_page, decode_search_page
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from imagesearch.v1 import products_pb2
from imagesearch.validation import (
    Violations,
    check_attribute_key,
    check_example_ids,
    check_facet_spec,
    check_filter,
    check_product,
    check_product_id,
    normalise_query_text,
)

log = structlog.get_logger(__name__)

# Domain error -> gRPC status. Looked up along the exception's MRO, so subclasses (ImageTooLarge) inherit.
STATUS_FOR_ERROR: dict[type[ImageSearchError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# How long a client should wait before retrying (sent as google.rpc.RetryInfo with UNAVAILABLE and
# RESOURCE_EXHAUSTED).
RETRY_DELAY_S = 1
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

_QUERY_KINDS = {
    "text": pb.QUERY_KIND_TEXT,
    "image": pb.QUERY_KIND_IMAGE,
    "multimodal": pb.QUERY_KIND_MULTIMODAL,
    "recommend": pb.QUERY_KIND_RECOMMEND,
}
# google.rpc.ResourceInfo.resource_type of a product, for NOT_FOUND details.
PRODUCT_RESOURCE_TYPE = products_pb2.Product.DESCRIPTOR.full_name
LIST_DEFAULT_PAGE_SIZE = 50
LIST_MAX_PAGE_SIZE = 1000
_CACHE_OUTCOMES = {"hit": pb.CACHE_OUTCOME_HIT, "miss": pb.CACHE_OUTCOME_MISS, "bypass": pb.CACHE_OUTCOME_BYPASS}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["ImageSearchService", Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def server_version() -> str:
    try:
        return version("imagesearch")
    except PackageNotFoundError:
        return "0+unknown"


def maps_errors(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn domain errors into statuses with details; never leak a traceback to the caller."""

    @functools.wraps(handler)
    async def wrapper(self: ImageSearchService, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await _within_deadline(handler(self, request, context), context)
        except ImageSearchError as exc:
            await self.on_error(exc)
            await _abort(context, exc)
            raise  # unreachable: abort raises
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception:
            await _abort_internal(context)
            raise

    return wrapper


async def _within_deadline(work: Awaitable[Resp], context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
    """Run the handler no longer than the caller's deadline: past it, nobody will read the answer, so the work
    (queued encodes, store calls) is cancelled instead of finishing late."""
    remaining = context.time_remaining()
    if remaining is None:
        return await work
    try:
        return await asyncio.wait_for(work, timeout=max(remaining, 0.0))
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the request finished") from None


async def _abort_internal(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # The traceback goes to the log, under the request id the caller is given; never to the caller.
    log.exception("unhandled error")
    request_id = structlog.contextvars.get_contextvars().get("request_id", "")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}", _request_id_metadata())


def status_for(exc: ImageSearchError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error: canonical code, message, and details a client can act on."""
    code = next((STATUS_FOR_ERROR[t] for t in type(exc).__mro__ if t in STATUS_FOR_ERROR), None)
    if code is None:
        log.error("unmapped domain error", error=repr(exc))
        code = grpc.StatusCode.INTERNAL
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(exc))
    if isinstance(exc, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        status.details.add().Pack(bad_request)
    if isinstance(exc, UnknownProducts):
        for product_id in exc.product_ids:
            info = error_details_pb2.ResourceInfo(
                resource_type=PRODUCT_RESOURCE_TYPE, resource_name=product_id, description="no product with this id"
            )
            status.details.add().Pack(info)
    if code in _RETRYABLE:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_DELAY_S))
        status.details.add().Pack(retry)
    return status


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: ImageSearchError) -> None:
    rich = rpc_status.to_status(status_for(exc))
    await context.abort(rich.code, rich.details, (*rich.trailing_metadata, *_request_id_metadata()))


def _request_id_metadata() -> tuple[tuple[str, str], ...]:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return ((REQUEST_ID_HEADER, str(request_id)),) if request_id else ()


class ImageChunks:
    """Collects one image's chunks, enforcing the per-chunk and per-image byte limits as they arrive."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._chunks: list[bytes] = []
        self._total = 0
        self.seen = False

    def add(self, chunk: bytes) -> None:
        limit = self._settings.max_chunk_bytes
        if len(chunk) > limit:
            raise InvalidArgument(FieldViolation("image_chunk", f"a chunk of {len(chunk)} bytes; the limit is {limit}"))
        self._total += len(chunk)
        if self._total > self._settings.max_image_bytes:
            self._chunks.clear()  # refused: free it now
            raise ImageTooLarge(
                FieldViolation("image_chunk", f"the image exceeds the limit of {self._settings.max_image_bytes} bytes")
            )
        self._chunks.append(chunk)
        self.seen = True

    @property
    def image(self) -> bytes | None:
        """The whole image; None when no chunk was sent (b"" when only empty chunks were)."""
        return b"".join(self._chunks) if self.seen else None


@dataclass
class StreamedRequest:
    head: Any
    image: bytes | None


async def read_stream(requests: AsyncIterable[Any], head_field: str, settings: Settings) -> StreamedRequest:
    """Read a "head message, then image chunks" stream. Refuses an oversized image as soon as the running
    total passes the limit, without reading (or buffering) the rest."""
    head: Any = None
    chunks = ImageChunks(settings)
    async for message in requests:
        which = message.WhichOneof("content")
        if which == head_field:
            if head is not None:
                raise InvalidArgument(FieldViolation(head_field, "sent twice: only the first message carries it"))
            head = getattr(message, head_field)
        elif which == "image_chunk":
            if head is None:
                raise InvalidArgument(
                    FieldViolation("image_chunk", f"arrived before {head_field}: the first message must carry it")
                )
            chunks.add(message.image_chunk)
        else:
            raise InvalidArgument(FieldViolation("content", f"empty message: set {head_field} or image_chunk"))
    if head is None:
        raise InvalidArgument(FieldViolation(head_field, "required: the first message must carry it"))
    return StreamedRequest(head=head, image=chunks.image)


async def read_bulk_stream(
    requests: AsyncIterable[Any], settings: Settings, fetches_urls: bool
) -> AsyncIterator[BulkItem]:
    """Split an IndexProducts stream into products. A problem with one product (bad field, oversized image)
    becomes that product's error; only a stream that cannot be parsed at all raises."""
    position = -1
    current: products_pb2.Product | None = None
    chunks = ImageChunks(settings)
    chunk_error: InvalidArgument | None = None
    async for message in requests:
        which = message.WhichOneof("content")
        if which == "product":
            if current is not None:
                yield _bulk_item(position, current, chunks.image, chunk_error, fetches_urls)
            position += 1
            current, chunks, chunk_error = message.product, ImageChunks(settings), None
        elif which == "image_chunk":
            if current is None:
                raise InvalidArgument(FieldViolation("image_chunk", "arrived before the first product message"))
            if chunk_error is None:
                try:
                    chunks.add(message.image_chunk)
                except InvalidArgument as exc:
                    chunk_error = exc  # skip the rest of this image, keep reading the stream
        else:
            raise InvalidArgument(FieldViolation("content", "empty message: set product or image_chunk"))
    if current is not None:
        yield _bulk_item(position, current, chunks.image, chunk_error, fetches_urls)


def check_image_source(image: bytes | None, product: Product, fetches_urls: bool, v: Violations) -> None:
    if image is not None:
        return
    if fetches_urls and product.image_url:
        return  # fetched from product.image_url
    hint = " (or set product.image_url)" if fetches_urls else ""
    v.add("image_chunk", f"required: send the product image after the product message{hint}")


def _bulk_item(
    position: int,
    message: products_pb2.Product,
    image: bytes | None,
    error: InvalidArgument | None,
    fetches_urls: bool,
) -> BulkItem:
    product = product_from_proto(message)
    v = Violations()
    check_product(product, v)
    if error is None:
        check_image_source(image, product, fetches_urls, v)
    else:
        v.items += error.violations
    return BulkItem(position, product, image, InvalidArgument(v.items) if v.items else None)


# Product fields that map one to one between the proto and the domain type (attributes is a map on both sides).
_PRODUCT_SCALARS = ("id", "name", "description", "category", "price", "currency", "image_url")


def product_from_proto(message: products_pb2.Product) -> Product:
    return Product(**{f: getattr(message, f) for f in _PRODUCT_SCALARS}, attributes=dict(message.attributes))


def product_to_proto(product: Product) -> products_pb2.Product:
    return products_pb2.Product(
        **{f: getattr(product, f) for f in _PRODUCT_SCALARS}, attributes=dict(product.attributes)
    )


def filter_from_proto(message: pb.SearchFilter) -> SearchFilter:
    return SearchFilter(
        categories=tuple(message.categories),
        price_min=message.price_min if message.HasField("price_min") else None,
        price_max=message.price_max if message.HasField("price_max") else None,
        attributes=tuple(sorted(message.attributes.items())),
    )


def query_from_proto(message: pb.SearchQuery, image: bytes | None, settings: Settings) -> Query:
    v = Violations()
    if message.image_url and image is not None:
        v.add("query.image_url", "send the image either as image_chunk messages or as image_url, not both")
    text = normalise_query_text(message.text, "query.text", settings.max_text_chars, v)
    like_ids, unlike_ids = _examples_from_proto(message, v)
    if not text and image is None and not message.image_url and not like_ids:
        v.add(
            "query.text",
            "a search needs text, an image (image_chunk messages or image_url), liked products "
            "(like_product_ids), or a combination; unlike_product_ids alone are not enough",
        )
    flt = filter_from_proto(message.filter)
    check_filter(flt, v)
    page_size = _page_size_from_proto(message, settings, v)
    threshold = message.score_threshold if message.HasField("score_threshold") else None
    if threshold is not None and not -1.0 <= threshold <= 1.0:  # also false for NaN
        v.add("query.score_threshold", f"must be a cosine similarity from -1 to 1, got {threshold}")
    weight = message.text_weight if message.HasField("text_weight") else 0.5
    if not 0.0 <= weight <= 1.0:
        v.add("query.text_weight", f"must be 0 to 1, got {weight}")
    if message.group_by:
        check_attribute_key(message.group_by, "query.group_by", v)
    diversity = message.diversity if message.HasField("diversity") else None
    if diversity is not None and not 0.0 <= diversity <= 1.0:
        v.add("query.diversity", f"must be 0 to 1, got {diversity}")
    facets = _facet_spec_from_proto(message, v)
    page = _search_page_from_proto(message.page_token, v)
    v.raise_if_any()
    return Query(
        text=text,
        image=image,
        flt=flt,
        top_k=page_size,
        score_threshold=threshold,
        text_weight=weight,
        like_ids=like_ids,
        unlike_ids=unlike_ids,
        include_liked=message.include_liked_products,
        group_by=message.group_by,
        diversity=diversity or None,  # 0 is plain ranking
        page=page,
        facets=facets,
    )


def _examples_from_proto(message: pb.SearchQuery, v: Violations) -> tuple[tuple[str, ...], tuple[str, ...]]:
    like_ids = check_example_ids(message.like_product_ids, "query.like_product_ids", v)
    unlike_ids = check_example_ids(message.unlike_product_ids, "query.unlike_product_ids", v)
    liked = set(like_ids)
    for i, product_id in enumerate(message.unlike_product_ids):
        if product_id in liked:
            v.add(f"query.unlike_product_ids[{i}]", "is also in like_product_ids: a product cannot be both")
    return like_ids, unlike_ids


def _page_size_from_proto(message: pb.SearchQuery, settings: Settings, v: Violations) -> int:
    # page_size takes precedence; without it, top_k (or its default) is the page size.
    if message.page_size:
        if not 1 <= message.page_size <= settings.max_top_k:
            v.add("query.page_size", f"must be 1 to {settings.max_top_k} (0 means top_k), got {message.page_size}")
        return message.page_size
    top_k = message.top_k or settings.default_top_k
    if not 1 <= top_k <= settings.max_top_k:
        v.add("query.top_k", f"must be 1 to {settings.max_top_k} (0 means {settings.default_top_k}), got {top_k}")
    return top_k


def _facet_spec_from_proto(message: pb.SearchQuery, v: Violations) -> FacetSpec:
    if not message.HasField("facet_spec"):
        return FacetSpec()
    spec = message.facet_spec
    keys, max_values = check_facet_spec(spec.attribute_keys, spec.max_values, "query.facet_spec", v)
    return FacetSpec(categories=spec.categories, attribute_keys=keys, max_values=max_values)


def _search_page_from_proto(token: str, v: Violations) -> SearchPage | None:
    if not token:
        return None
    try:
        return decode_search_page(token, SEARCH_PAGE_TOKEN_FIELD)
    except InvalidArgument as exc:
        v.items += exc.violations
        return None


def list_request_from_proto(request: pb.ListProductsRequest) -> tuple[SearchFilter, int, ListPage | None]:
    v = Violations()
    flt = filter_from_proto(request.filter)
    check_filter(flt, v, prefix="filter")
    if request.page_size < 0:
        v.add("page_size", f"must be >= 0 (0 means {LIST_DEFAULT_PAGE_SIZE}), got {request.page_size}")
    # googleapis convention: 0 means the default, and sizes above the maximum are coerced, not refused.
    page_size = min(request.page_size or LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE)
    page = None
    if request.page_token:
        try:
            page = decode_list_page(request.page_token, LIST_PAGE_TOKEN_FIELD)
        except InvalidArgument as exc:
            v.items += exc.violations
    v.raise_if_any()
    return flt, page_size, page


def hits_to_proto(hits: list[Hit]) -> list[pb.SearchHit]:
    return [pb.SearchHit(product=product_to_proto(h.product), score=h.score) for h in hits]


def facets_to_proto(facets: Facets | None) -> dict[str, Any]:
    """The SearchResponse fields for facets (none when not requested)."""
    if facets is None:
        return {}
    return {
        "category_facets": [pb.FacetCount(value=c.value, count=c.count) for c in facets.categories],
        "attribute_facets": [
            pb.AttributeFacet(key=key, values=[pb.FacetCount(value=c.value, count=c.count) for c in counts])
            for key, counts in facets.attributes
        ],
    }


class Admission:
    """Bounds the expensive RPCs (those that encode) in flight. Beyond the bound, callers get
    RESOURCE_EXHAUSTED at once instead of queueing without limit (and holding their uploads in memory)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise Overloaded(f"the server is at its limit of {self.limit} concurrent encoding requests; retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class ImageSearchService(pb_grpc.ImageSearchServiceServicer):
    def __init__(self, catalog: Catalog, settings: Settings, store_health: StoreHealth | None = None) -> None:
        self.catalog = catalog
        self.settings = settings
        self.store_health = store_health
        self.admission = Admission(settings.max_concurrent_requests)

    async def on_error(self, exc: ImageSearchError) -> None:
        if isinstance(exc, StoreUnavailable) and self.store_health is not None:
            await self.store_health.store_failed(exc)

    @maps_errors
    async def Search(
        self, request_iterator: AsyncIterable[pb.SearchRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SearchResponse:
        with self.admission.slot():
            streamed = await read_stream(request_iterator, "query", self.settings)
            query = query_from_proto(streamed.head, streamed.image, self.settings)
            if streamed.head.image_url:
                image = await self.catalog.fetch_image(streamed.head.image_url, field="query.image_url")
                query = dataclasses.replace(query, image=image)
            outcome = await self.catalog.search(query)
        return pb.SearchResponse(
            hits=hits_to_proto(outcome.hits),
            query_kind=_QUERY_KINDS[outcome.kind],
            cached=outcome.cached,
            server_time_ms=outcome.server_time_ms,
            embedding_cache=_CACHE_OUTCOMES[outcome.embedding_cache],
            result_cache=_CACHE_OUTCOMES[outcome.result_cache],
            next_page_token=outcome.next_page_token,
            **facets_to_proto(outcome.facets),
        )

    @maps_errors
    async def IndexProduct(
        self, request_iterator: AsyncIterable[pb.IndexProductRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IndexProductResponse:
        with self.admission.slot():
            streamed = await read_stream(request_iterator, "product", self.settings)
            product = product_from_proto(streamed.head)
            v = Violations()
            check_product(product, v)
            check_image_source(streamed.image, product, self.catalog.fetches_urls, v)
            v.raise_if_any()
            created = await self.catalog.index(product, streamed.image)
        return pb.IndexProductResponse(product=product_to_proto(product), created=created)

    async def IndexProducts(
        self, request_iterator: AsyncIterable[pb.IndexProductsRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.IndexProductsResponse]:
        try:
            with self.admission.slot():
                items = read_bulk_stream(request_iterator, self.settings, self.catalog.fetches_urls)
                async for result in index_many(self.catalog, items):
                    if isinstance(result.error, StoreUnavailable):
                        await self.on_error(result.error)
                    yield pb.IndexProductsResponse(
                        id=result.product_id,
                        position=result.position,
                        created=result.created,
                        error=status_for(result.error) if result.error is not None else None,
                    )
        except ImageSearchError as exc:
            await self.on_error(exc)
            await _abort(context, exc)
        except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError):
            raise
        except Exception:
            await _abort_internal(context)

    @maps_errors
    async def GetProduct(
        self, request: pb.GetProductRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetProductResponse:
        _check_id(request.id)
        return pb.GetProductResponse(product=product_to_proto(await self.catalog.get(request.id)))

    @maps_errors
    async def DeleteProduct(
        self, request: pb.DeleteProductRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteProductResponse:
        _check_id(request.id)
        await self.catalog.delete(request.id)
        return pb.DeleteProductResponse()

    @maps_errors
    async def ListProducts(
        self, request: pb.ListProductsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListProductsResponse:
        flt, page_size, page = list_request_from_proto(request)
        listed = await self.catalog.list_products(flt, page_size, page)
        return pb.ListProductsResponse(
            products=[product_to_proto(p) for p in listed.products], next_page_token=listed.next_page_token
        )

    @maps_errors
    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServiceInfoResponse:
        encoder = self.catalog.encoder.encoder
        cache = self.catalog.cache
        s = self.settings
        Info = pb.GetServiceInfoResponse
        return Info(
            server_version=server_version(),
            model=Info.ModelInfo(
                name=encoder.model_id,
                embedding_dimension=encoder.dimension,
                device=encoder.device,
                image_size=encoder.image_size,
                image_tower_precision=encoder.image_precision,
                text_tower_precision=encoder.text_precision,
                torch_threads=encoder.torch_threads,
            ),
            store=Info.StoreInfo(backend=self.catalog.store.backend, product_count=await self.catalog.store.count()),
            cache=Info.CacheInfo(
                backend=cache.backend.name,
                available=cache.backend.available,
                embedding_hits=cache.stats.embedding_hits,
                embedding_misses=cache.stats.embedding_misses,
                result_hits=cache.stats.result_hits,
                result_misses=cache.stats.result_misses,
            ),
            limits=Info.Limits(
                max_image_bytes=s.max_image_bytes,
                max_image_pixels=s.max_image_pixels,
                max_chunk_bytes=s.max_chunk_bytes,
                max_text_chars=s.max_text_chars,
                max_top_k=s.max_top_k,
            ),
        )


def _check_id(product_id: str) -> None:
    v = Violations()
    check_product_id(product_id, "id", v)
    v.raise_if_any()
