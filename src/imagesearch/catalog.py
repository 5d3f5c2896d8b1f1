"""The search and indexing logic: encoder + cache + store, with no knowledge of gRPC.

`service.py` validates requests, converts them into the types here and maps the errors raised here onto gRPC
status codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from imagesearch.cache import ResultKey, SearchCache
from imagesearch.domain import Hit, Product, SearchFilter
from imagesearch.encoder import AsyncEncoder
from imagesearch.errors import FieldViolation, InvalidArgument, NotFound
from imagesearch.store.base import VectorStore
from imagesearch.urlfetch import ImageFetcher

QueryKind = Literal["text", "image", "multimodal"]
CacheOutcome = Literal["hit", "miss", "bypass"]

DEFAULT_TEXT_WEIGHT = 0.5


@dataclass(frozen=True)
class Query:
    """A validated search. `text` is already normalised; `image` holds the raw bytes (or None)."""

    text: str
    image: bytes | None
    flt: SearchFilter
    top_k: int
    score_threshold: float | None = None
    text_weight: float = DEFAULT_TEXT_WEIGHT

    @property
    def kind(self) -> QueryKind:
        if self.text and self.image is not None:
            return "multimodal"
        return "image" if self.image is not None else "text"


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    kind: QueryKind
    embedding_cache: CacheOutcome
    result_cache: CacheOutcome
    server_time_ms: float

    @property
    def cached(self) -> bool:
        return self.result_cache == "hit"


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
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.cache = cache
        self.limits = limits
        self.fetcher = fetcher

    @property
    def fetches_urls(self) -> bool:
        return self.fetcher is not None and self.fetcher.policy.enabled

    async def fetch_image(self, url: str, *, field: str) -> bytes:
        if self.fetcher is None:
            raise InvalidArgument(FieldViolation(field, "fetching images by URL is disabled on this server"))
        return await self.fetcher.fetch(url, field=field)

    async def embed_product_image(self, image: bytes | None, product: Product) -> np.ndarray:
        """Embed the image sent with a product, or else the one at its image_url (when fetching is enabled)."""
        if image is None:
            image = await self.fetch_image(product.image_url, field="product.image_url")
        return await self.embed_image(image)

    async def search(self, query: Query) -> SearchOutcome:
        started = time.perf_counter()
        vector, embedding_cache = await self._query_vector(query)
        result_key = None
        if self.cache.enabled:
            result_key = await self.cache.result_key(
                ResultKey(vector=vector, flt=query.flt, top_k=query.top_k, score_threshold=query.score_threshold)
            )
        if result_key is not None:
            cached_hits = await self.cache.get_results(result_key)
            if cached_hits is not None:
                return SearchOutcome(cached_hits, query.kind, embedding_cache, "hit", _ms_since(started))
        hits = await self.store.search(vector, query.flt, limit=query.top_k, score_threshold=query.score_threshold)
        if result_key is not None:
            await self.cache.put_results(result_key, hits)
        result_cache: CacheOutcome = "miss" if result_key is not None else "bypass"
        return SearchOutcome(hits, query.kind, embedding_cache, result_cache, _ms_since(started))

    async def index(self, product: Product, image: bytes | None) -> bool:
        """Embed the image (or the one at product.image_url) and upsert the product. True if it was created."""
        [created] = await self.store_many([(product, await self.embed_product_image(image, product))])
        return created

    async def embed_image(self, image: bytes) -> np.ndarray:
        return await self.encoder.encode_image_bytes(
            image, field="image_chunk", max_pixels=self.limits.max_image_pixels
        )

    async def store_many(self, items: list[tuple[Product, np.ndarray]]) -> list[bool]:
        """Upsert embedded products, then invalidate cached results (after the write, so a search racing with
        it can at worst cache the old catalogue under the old generation, never the reverse)."""
        created = await self.store.upsert(items)
        await self.cache.bump_generation()
        return created

    async def get(self, product_id: str) -> Product:
        product = await self.store.get(product_id)
        if product is None:
            raise NotFound(f"no product with id {product_id!r}")
        return product

    async def delete(self, product_id: str) -> None:
        if not await self.store.delete(product_id):
            raise NotFound(f"no product with id {product_id!r}")
        await self.cache.bump_generation()

    async def _query_vector(self, query: Query) -> tuple[np.ndarray, CacheOutcome]:
        outcomes: list[CacheOutcome] = []
        text_vector = image_vector = None
        if query.text:
            text_vector, outcome = await self._cached_embedding("text", query.text.encode("utf-8"))
            outcomes.append(outcome)
        if query.image is not None:
            image_vector, outcome = await self._cached_embedding("image", query.image)
            outcomes.append(outcome)
        if text_vector is not None and image_vector is not None:
            vector = _combine(text_vector, image_vector, query.text_weight)
        else:
            vector = text_vector if text_vector is not None else image_vector
        assert vector is not None  # validation guarantees text or image
        combined: CacheOutcome = (
            "bypass" if "bypass" in outcomes else "hit" if all(o == "hit" for o in outcomes) else "miss"
        )
        return vector, combined

    async def _cached_embedding(
        self, kind: Literal["text", "image"], content: bytes
    ) -> tuple[np.ndarray, CacheOutcome]:
        key = self.cache.embedding_key(kind, content) if self.cache.enabled else None
        if key is not None:
            cached = await self.cache.get_embedding(key, self.encoder.encoder.dimension)
            if cached is not None:
                return cached, "hit"
        if kind == "text":
            vector = await self.encoder.encode_text(content.decode("utf-8"))
        else:
            vector = await self.embed_image(content)
        if key is not None:
            await self.cache.put_embedding(key, vector)
        return vector, "miss" if key is not None else "bypass"


def _combine(text_vector: np.ndarray, image_vector: np.ndarray, text_weight: float) -> np.ndarray:
    mixed = text_weight * text_vector + (1.0 - text_weight) * image_vector
    norm = float(np.linalg.norm(mixed))
    # Opposite unit vectors at equal weight cancel out; fall back to the image, the more specific query.
    return (mixed / norm).astype(np.float32) if norm > 1e-6 else image_vector


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
