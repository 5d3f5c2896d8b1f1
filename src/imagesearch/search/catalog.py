"""The search and indexing logic: encoder + cache + store, with no knowledge of gRPC.

The gRPC layer (api/) converts requests into domain types, search/validation.py applies the request rules, and
the errors raised here are mapped onto gRPC status codes in api/status.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import structlog

from imagesearch.domain import (
    CacheOutcome,
    CacheTier,
    CatalogDescription,
    FacetSpec,
    Hit,
    ListPage,
    Modality,
    Product,
    ProductPage,
    Query,
    SearchFilter,
    SearchOutcome,
    SearchPage,
    canonical_bytes,
    digest,
)
from imagesearch.errors import FieldViolation, InvalidArgument, UnknownProducts
from imagesearch.images import ImageUpload, NormalizedBox
from imagesearch.model.encoder import AsyncEncoder
from imagesearch.ranking import RankingSpec
from imagesearch.search.cache import ResultKey, SearchCache
from imagesearch.search.paging import (
    LIST_PAGE_TOKEN_FIELD,
    MAX_SEARCH_DEPTH,
    SEARCH_PAGE_TOKEN_FIELD,
    CatalogueVersion,
    check_list_page,
    check_search_page,
    encode_list_page,
    encode_search_page,
)
from imagesearch.search.urlfetch import ImageFetcher
from imagesearch.store.base import VectorStore
from imagesearch.tracing import CACHE_HIT, IMAGE_BYTES, tracer

#: With group_by, families are collected from at most this many best matches.
MAX_GROUP_SCAN = 5000

#: A product ready to store: as stored (its images with their SHA-256), and one embedding per image, in order.
EmbeddedProduct = tuple[Product, np.ndarray]
T = TypeVar("T")


@dataclass(frozen=True)
class _RankedPage:
    hits: list[Hit]
    has_more: bool
    result_cache: CacheOutcome


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int


class Catalog:
    def __init__(
        self,
        encoder: AsyncEncoder,
        store: VectorStore,
        cache: SearchCache,
        limits: Limits,
        fetcher: ImageFetcher | None = None,
        on_cache_outcome: Callable[[CacheTier, CacheOutcome], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.cache = cache
        self.limits = limits
        self.fetcher = fetcher
        self.version = CatalogueVersion(shared=cache.shared)
        # The numeric attribute keys some product has (ranking rules may name only those), read from the store
        # when a rule names a key not seen yet: keys only appear through writes, which may come via other replicas.
        self._numeric_keys: frozenset[str] = frozenset()
        # Told each search's cache outcome per tier (metrics), so the cache itself stays free of metrics.
        self._on_cache_outcome = on_cache_outcome

    @property
    def fetches_urls(self) -> bool:
        return self.fetcher is not None and self.fetcher.policy.enabled

    async def describe(self) -> CatalogDescription:
        return CatalogDescription(
            model=self.encoder.describe(),
            store_backend=self.store.backend,
            product_count=await self.store.count(),
            cache=self.cache.describe(),
        )

    async def fetch_image(self, url: str, *, field: str) -> bytes:
        if self.fetcher is None:
            raise InvalidArgument(FieldViolation(field, "fetching images by URL is disabled on this server"))
        # The host only: a URL's path and query can hold credentials (signed URLs).
        with tracer.start_as_current_span("image.fetch", attributes={"server.address": _host(url)}) as span:
            image = await self.fetcher.fetch(url, field=field)
            span.set_attribute(IMAGE_BYTES, len(image))
        return image

    async def embed_product(self, product: Product, uploads: Sequence[ImageUpload]) -> EmbeddedProduct:
        """Embed every image of a product (the bytes sent, or else those at its URL, when fetching is enabled),
        concurrently, so that the micro-batcher forwards them together. Returns the product as it will be stored:
        `images` describes each image with the SHA-256 of its bytes."""
        single = not product.images  # one image, described by the product's own fields

        async def embed(i: int, upload: ImageUpload) -> tuple[str, np.ndarray]:
            data = upload.data
            if data is None:
                url_field = "product.image_url" if single else f"product.images[{i}].url"
                data = await self.fetch_image(upload.image.url, field=url_field)
            field = "image_chunk" if single else f"product.images[{i}]"
            vector = await self.encoder.encode_image_bytes(data, field=field, max_pixels=self.limits.max_image_pixels)
            return hashlib.sha256(data).hexdigest(), vector

        embedded = await _all_or_none([embed(i, upload) for i, upload in enumerate(uploads)])
        images = tuple(
            dataclasses.replace(upload.image, sha256=sha) for upload, (sha, _) in zip(uploads, embedded, strict=True)
        )
        vectors = np.stack([vector for _, vector in embedded]).astype(np.float32, copy=False)
        return dataclasses.replace(product, images=images), vectors

    async def search(self, query: Query) -> SearchOutcome:
        started = time.perf_counter()
        if query.image_url:
            image = await self.fetch_image(query.image_url, field="query.image_url")
            query = dataclasses.replace(query, image=image, image_url="")
        if len(query.regions) > 1:
            return await self._search_regions(query, started)
        # Read once, before searching: it versions both the page token and the result-cache key. A write racing
        # with this search bumps it after it was read, so the next page's token is refused and the result is
        # cached under the old generation: never a page or a result from another catalogue.
        generation = await self.cache.generation() if self.cache.enabled else None
        version = self.version.current(generation)
        query_digest = query.digest()
        offset = 0
        if query.page is not None:
            check_search_page(query.page, query_digest, version, SEARCH_PAGE_TOKEN_FIELD)
            offset = query.page.offset
        encoded, embedding_cache = await self._encoded_vector(query)
        page = await self._ranked_page(query, encoded, offset, generation)
        facets = None
        if not query.facets.is_empty:
            facets = await self.store.facets(query.flt, query.facets, exclude_ids=query.exclude_ids)
        next_page_token = ""
        if page.has_more:
            next_page_token = encode_search_page(SearchPage(query_digest, version, offset + len(page.hits)))
        if self._on_cache_outcome is not None:
            self._on_cache_outcome("embedding", embedding_cache)
            self._on_cache_outcome("result", page.result_cache)
        # Lands on the RPC's single log line (the logging interceptor logs in this same context).
        structlog.contextvars.bind_contextvars(embedding_cache=embedding_cache, result_cache=page.result_cache)
        return SearchOutcome(
            page.hits,
            query.kind,
            embedding_cache,
            page.result_cache,
            _ms_since(started),
            next_page_token=next_page_token,
            facets=facets,
            mode=query.mode,
        )

    async def _search_regions(self, query: Query, started: float) -> SearchOutcome:
        """One search per region of the query image ("shop the look"), run together (their encodes share the
        micro-batcher's forwards); facets, which do not depend on the image, are counted once."""
        single = dataclasses.replace(query, facets=FacetSpec())

        async def one(box: NormalizedBox) -> SearchOutcome:
            return await self.search(dataclasses.replace(single, regions=(box,)))

        outcomes = await _all_or_none([one(box) for box in query.regions])
        facets = None
        if not query.facets.is_empty:
            facets = await self.store.facets(query.flt, query.facets, exclude_ids=query.exclude_ids)
        return SearchOutcome(
            [],
            query.kind,
            _combined([o.embedding_cache for o in outcomes]),
            _combined([o.result_cache for o in outcomes]),
            _ms_since(started),
            facets=facets,
            mode=query.mode,
            region_results=tuple((box, o.hits) for box, o in zip(query.regions, outcomes, strict=True)),
        )

    async def check_rule_fields(self, ranking: RankingSpec, field: str) -> None:
        """Raise InvalidArgument for a rule naming a numeric attribute that no product of the catalogue has (a
        misspelt key would otherwise rank every product as if it lacked the value)."""
        wanted = {rule.field for rule in ranking.rules if rule.field is not None}
        if wanted <= self._numeric_keys:
            return
        self._numeric_keys = frozenset(await self.store.numeric_keys())
        known = ", ".join(sorted(self._numeric_keys)) or "none yet"
        violations = [
            FieldViolation(
                f"{field}.rules[{i}].field",
                f"no product has the numeric attribute {rule.field!r}; the catalogue's numeric attributes: {known}",
            )
            for i, rule in enumerate(ranking.rules)
            if rule.field is not None and rule.field not in self._numeric_keys
        ]
        if violations:
            raise InvalidArgument(violations)

    async def list_products(self, flt: SearchFilter, page_size: int, page: ListPage | None) -> ProductPage:
        filter_digest = digest(canonical_bytes(flt.key_value()))[:32]
        if page is not None:
            check_list_page(page, filter_digest, LIST_PAGE_TOKEN_FIELD)
        products, cursor = await self.store.scroll(flt, page_size, None if page is None else page.cursor)
        token = "" if cursor is None else encode_list_page(ListPage(filter_digest, cursor))
        return ProductPage(products, token)

    async def index(self, product: Product, uploads: Sequence[ImageUpload]) -> tuple[Product, bool]:
        """Embed the product's images and upsert it with all of them in one write. Returns the product as stored
        and whether it was created."""
        embedded = await self.embed_product(product, uploads)
        [created] = await self.store_many([embedded])
        return embedded[0], created

    async def embed_image(self, image: bytes, region: NormalizedBox | None = None) -> np.ndarray:
        return await self.encoder.encode_image_bytes(
            image, field="image_chunk", max_pixels=self.limits.max_image_pixels, region=region
        )

    async def store_many(self, items: list[EmbeddedProduct]) -> list[bool]:
        """Upsert embedded products, then invalidate cached results (after the write, so a search racing with
        it can at worst cache the old catalogue under the old generation, never the reverse)."""
        created = await self.store.upsert(items)
        await self._changed()
        return created

    async def get(self, product_id: str) -> Product:
        product = await self.store.get(product_id)
        if product is None:
            raise UnknownProducts([product_id])
        return product

    async def delete(self, product_id: str) -> None:
        if not await self.store.delete(product_id):
            raise UnknownProducts([product_id])
        await self._changed()

    async def _changed(self) -> None:
        self.version.bump()
        await self.cache.bump_generation()

    async def _ranked_page(
        self, query: Query, encoded: np.ndarray | None, offset: int, generation: int | None
    ) -> _RankedPage:
        limit = min(query.top_k, MAX_SEARCH_DEPTH - offset)
        # One hit more than the page tells whether there is a next page (none past the paging limit).
        fetch = limit + 1 if offset + limit < MAX_SEARCH_DEPTH else limit
        key = None
        if generation is not None:
            key = self.cache.result_key(generation, ResultKey(query, encoded, offset, fetch))
        ranked = None
        if key is not None:
            # Lookups only: each span costs the request ~0.1 ms on 2 cores, and a slow cache shows in its reads.
            with tracer.start_as_current_span("cache.result.get") as span:
                ranked = await self.cache.get_results(key)
                span.set_attribute(CACHE_HIT, ranked is not None)
        outcome: CacheOutcome = "hit"
        if ranked is None:
            ranked = await self._rank(await self._ranking_vector(query, encoded), query, offset, fetch)
            if key is not None:
                await self.cache.put_results(key, ranked)
            outcome = "miss" if key is not None else "bypass"
        return _RankedPage(ranked[:limit], len(ranked) > limit, outcome)

    async def _rank(self, vector: np.ndarray | None, query: Query, offset: int, count: int) -> list[Hit]:
        async def search(limit: int, start: int) -> list[Hit]:
            return await self.store.search(
                vector,
                query.flt,
                limit,
                start,
                query.score_threshold,
                exclude_ids=query.exclude_ids,
                diversity=query.diversity,
                lexical=query.lexical,
                collapse=query.collapse,
                ranking=query.ranking,
                explain=query.explain,
            )

        if not query.group_by:
            return await search(count, offset)
        return await best_per_group(search, query.group_by, offset, count)

    async def _ranking_vector(self, query: Query, encoded: np.ndarray | None) -> np.ndarray | None:
        """The dense side of the search: None for a lexical one."""
        if not (query.like_ids or query.unlike_ids):
            # Validation guarantees text, an image or examples; only a lexical search encodes nothing.
            assert encoded is not None or query.mode == "lexical"
            return encoded
        wanted = [*query.like_ids, *query.unlike_ids]
        stored = await self.store.vectors(wanted)
        missing = [pid for pid in wanted if pid not in stored]
        if missing:
            raise UnknownProducts(missing)
        positives = [stored[pid] for pid in query.like_ids] + ([encoded] if encoded is not None else [])
        return recommend_vector(positives, [stored[pid] for pid in query.unlike_ids])

    async def _encoded_vector(self, query: Query) -> tuple[np.ndarray | None, CacheOutcome]:
        if not query.encodes:
            return None, "bypass"  # a search by example products only: nothing to encode
        outcomes: list[CacheOutcome] = []
        text_vector = image_vector = None
        if query.text:
            text_vector, outcome = await self._cached_embedding("text", query.text.encode("utf-8"))
            outcomes.append(outcome)
        if query.image is not None:
            region = query.regions[0] if query.regions else None
            image_vector, outcome = await self._cached_embedding("image", query.image, region)
            outcomes.append(outcome)
        vector: np.ndarray | None
        if text_vector is not None and image_vector is not None:
            vector = _combine(text_vector, image_vector, query.text_weight)
        else:
            vector = text_vector if text_vector is not None else image_vector
        assert vector is not None  # query.encodes: text or an image
        return vector, _combined(outcomes)

    async def _cached_embedding(
        self, kind: Modality, content: bytes, region: NormalizedBox | None = None
    ) -> tuple[np.ndarray, CacheOutcome]:
        key = self.cache.embedding_key(kind, content, region) if self.cache.enabled else None
        if key is not None:
            with tracer.start_as_current_span("cache.embedding.get") as span:
                cached = await self.cache.get_embedding(key, self.encoder.dimension)
                span.set_attribute(CACHE_HIT, cached is not None)
            if cached is not None:
                return cached, "hit"
        if kind == "text":
            vector = await self.encoder.encode_text(content.decode("utf-8"))
        else:
            vector = await self.embed_image(content, region)
        if key is not None:
            await self.cache.put_embedding(key, vector)
        return vector, "miss" if key is not None else "bypass"


SearchPageFn = Callable[[int, int], Awaitable[list[Hit]]]


async def best_per_group(search: SearchPageFn, group_by: str, offset: int, count: int) -> list[Hit]:
    """Families `offset` to `offset + count` of a ranking: each family (products sharing the `group_by`
    attribute value; a product without it is a family of its own) appears once, as its best-ranked hit.

    `search(limit, start)` returns the ranking's hits from `start` on. The ranking is scanned from the top in
    growing batches (so that every page is a slice of the same family list) until enough families are found,
    the ranking ends, or MAX_GROUP_SCAN hits were scanned.
    """
    wanted = offset + count
    families: list[Hit] = []
    seen: set[tuple[bool, str]] = set()
    scanned = 0
    batch = max(4 * wanted, 64)  # families of a few variants each rarely need a second batch
    while len(families) < wanted and scanned < MAX_GROUP_SCAN:
        batch = min(batch, MAX_GROUP_SCAN - scanned)
        hits = await search(batch, scanned)
        for hit in hits:
            value = hit.product.attributes.get(group_by)
            family = (True, value) if value is not None else (False, hit.product.id)
            if family not in seen:
                seen.add(family)
                families.append(hit)
        scanned += len(hits)
        if len(hits) < batch:
            break  # the ranking has no more hits
        batch *= 2
    return families[offset:wanted]


def recommend_vector(positives: list[np.ndarray], negatives: list[np.ndarray]) -> np.ndarray:
    """The query vector for a search by examples: Qdrant's "average_vector" recommendation strategy,
    avg_pos + (avg_pos - avg_neg), L2-normalised (avg_pos alone without negatives)."""
    average = np.mean(positives, axis=0)
    target = 2.0 * average - np.mean(negatives, axis=0) if negatives else average
    norm = float(np.linalg.norm(target))
    if norm < 1e-6:
        # Examples that cancel out (e.g. opposite positives) leave no direction; fall back to the first one.
        target, norm = positives[0], float(np.linalg.norm(positives[0]))
    return (target / norm).astype(np.float32)


def _combine(text_vector: np.ndarray, image_vector: np.ndarray, text_weight: float) -> np.ndarray:
    mixed = text_weight * text_vector + (1.0 - text_weight) * image_vector
    norm = float(np.linalg.norm(mixed))
    # Opposite unit vectors at equal weight cancel out; fall back to the image, the more specific query.
    return (mixed / norm).astype(np.float32) if norm > 1e-6 else image_vector


def _combined(outcomes: list[CacheOutcome]) -> CacheOutcome:
    """One outcome for several lookups: a hit only when all hit."""
    return "bypass" if "bypass" in outcomes else "hit" if all(o == "hit" for o in outcomes) else "miss"


async def _all_or_none(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the calls together; when one fails, cancel the others and raise its error (not an ExceptionGroup:
    the caller maps one domain error onto one status)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        # Waited for, so that none runs on after the call and no other error goes unretrieved.
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:  # not a URL at all: the fetcher says so to the caller
        return ""


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
