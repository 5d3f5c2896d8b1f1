"""The server backend: a Qdrant server or cluster through qdrant-client's async client (gRPC preferred).

A collection created before hybrid search gets its sparse lexical vector when the store opens: the vector name is
added to the collection (`create_vector_name`, Qdrant's API for an existing collection) and every point's BM25
terms are derived from its stored payload (`update_vectors`; the CLIP vectors are untouched). Points that have the
vector are skipped, so an interrupted update, or two replicas starting at once, resume and repeat harmlessly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import qdrant_edge as qe
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ApiException

from imagesearch.domain import Facets, FacetSpec, Hit, LexicalQuery, Product, SearchFilter, point_id_for
from imagesearch.errors import StoreConfigError, StoreUnavailable
from imagesearch.store.base import (
    ATTRIBUTE_PAIRS,
    BM25_SCORE,
    CATEGORY,
    DENSE_COSINE,
    DENSE_VECTOR,
    DIVERSITY_CANDIDATES,
    FACET_SCAN_VALUES,
    HYBRID_CANDIDATES,
    INDEXED_FIELDS,
    LEXICAL_MODEL,
    LEXICAL_VECTOR,
    MISSING_SCORES,
    PRICE,
    RESCORED_COSINE,
    RRF_K,
    Vector,
    attribute_pair,
    check_cursor,
    check_paging,
    check_search,
    created_flags,
    facets_from_counts,
    last_per_id,
    lexical_document,
    lexical_terms,
    mmr_order,
    point_ids_by_product,
    point_vectors,
    product_from_payload,
    product_to_payload,
    score_scale,
    stored_vector,
    vector_values,
    weighted_factors,
)

# Collection metadata key under which the store records what the collection was created for.
_META_KEY = "imagesearch"
_SCHEMA_TYPES = {"keyword": models.PayloadSchemaType.KEYWORD, "float": models.PayloadSchemaType.FLOAT}
# attribute_pairs is only ever matched, never read back (the `attributes` map is).
_HIT_PAYLOAD = models.PayloadSelectorExclude(exclude=[ATTRIBUTE_PAIRS])
_LEXICAL_PARAMS = models.SparseVectorParams(modifier=models.Modifier.IDF)
# Points whose lexical side is filled in per request while an older collection is brought up to date.
_BACKFILL_BATCH = 500


class QdrantServerStore:
    """VectorStore over a Qdrant server or cluster, for deployments that scale out.

    Use `QdrantServerStore.open` (or `from_client` to bring a client configured your own way).
    """

    backend = "qdrant"

    def __init__(
        self, client: AsyncQdrantClient, collection: str, dimension: int, timeout_s: float, where: str
    ) -> None:
        self.dimension = dimension
        self._client = client
        self._collection = collection
        self._timeout_s = timeout_s
        self._where = where
        self._closed = False
        # Serialises this process's writes so that the created/replaced flags cannot race each other. Writers in
        # other replicas can still race: then a flag may be wrong, never the stored data (upserts are idempotent).
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str | None,
        dimension: int,
        model_id: str,
        collection: str = "products",
        api_key: str | None = None,
        timeout_s: float = 5.0,
        location: str | None = None,
        *,
        grpc_port: int = 6334,
    ) -> QdrantServerStore:
        """Connect to Qdrant at `url` (its REST address, e.g. http://qdrant:6333; gRPC is used, on `grpc_port`).

        Creates `collection` (cosine distance, payload indexes) if it does not exist. Raises StoreConfigError if
        it exists with another vector size or distance, or was created for another model; StoreUnavailable if
        the server cannot be reached within `timeout_s` (which also bounds every later call).
        `location=":memory:"` instead of `url` runs qdrant-client's in-process local mode: for tests only.
        """
        if (url is None) == (location is None):
            raise ValueError("give exactly one of url or location")
        client = AsyncQdrantClient(
            url=url,
            location=location,
            api_key=api_key,
            prefer_grpc=True,
            grpc_port=grpc_port,
            timeout=max(1, math.ceil(timeout_s)),
            # The compatibility check is a blocking HTTP request made inside the constructor.
            check_compatibility=False,
        )
        return await cls.from_client(client, dimension, model_id, collection, timeout_s, where=url or str(location))

    @classmethod
    async def from_client(
        cls,
        client: AsyncQdrantClient,
        dimension: int,
        model_id: str,
        collection: str = "products",
        timeout_s: float = 5.0,
        where: str = "the configured Qdrant",
    ) -> QdrantServerStore:
        """Like `open`, over an existing client, which the store then owns (closes). `where` names it in errors."""
        store = cls(client, collection, dimension, timeout_s, where)
        try:
            await store._prepare_collection(model_id)
        except BaseException:
            await client.close()
            raise
        return store

    async def upsert(self, items: Sequence[tuple[Product, Vector]]) -> list[bool]:
        """See VectorStore.upsert."""
        if not items:
            return []
        latest = {point_id_for(pid): item for pid, item in last_per_id(items).items()}
        points = [
            models.PointStruct(
                id=point_id,
                vector=_point_vectors(vector_values(vector, self.dimension), product),
                payload=product_to_payload(product),
            )
            for point_id, (product, vector) in latest.items()
        ]
        async with self._write_lock, self._guard("upsert"):
            found = await self._client.retrieve(self._collection, list(latest), with_payload=False, with_vectors=False)
            await self._client.upsert(self._collection, points, wait=True)
        existing = {latest[str(record.id)][0].id for record in found}
        return created_flags([product.id for product, _ in items], existing)

    async def get(self, product_id: str) -> Product | None:
        """See VectorStore.get."""
        async with self._guard("get"):
            records = await self._client.retrieve(self._collection, [point_id_for(product_id)], with_payload=True)
        if not records or records[0].payload is None:
            return None
        return product_from_payload(records[0].payload)

    async def delete(self, product_id: str) -> bool:
        """See VectorStore.delete."""
        point_id = point_id_for(product_id)
        async with self._write_lock, self._guard("delete"):
            if not await self._client.retrieve(self._collection, [point_id], with_payload=False):
                return False
            await self._client.delete(self._collection, models.PointIdsList(points=[point_id]), wait=True)
        return True

    async def search(
        self,
        vector: Vector | None,
        flt: SearchFilter,
        limit: int,
        offset: int = 0,
        score_threshold: float | None = None,
        *,
        exclude_ids: Collection[str] = (),
        diversity: float | None = None,
        lexical: LexicalQuery | None = None,
    ) -> list[Hit]:
        """See VectorStore.search."""
        check_paging(limit, offset)
        check_search(vector, lexical)
        if lexical is not None:
            return await self._search_words(
                vector, lexical, flt, limit, offset, score_threshold, exclude_ids, diversity
            )
        assert vector is not None
        values = vector_values(vector, self.dimension)
        mmr = models.Mmr(diversity=diversity, candidates_limit=DIVERSITY_CANDIDATES) if diversity else None
        async with self._guard("search"):
            response = await self._client.query_points(
                self._collection,
                query=models.NearestQuery(nearest=values, mmr=mmr),
                query_filter=_qdrant_filter(flt, exclude_ids),
                limit=limit,
                offset=offset,
                score_threshold=score_threshold,
                with_payload=_HIT_PAYLOAD,
            )
        return [Hit(product_from_payload(p.payload or {}), p.score) for p in response.points]

    async def _search_words(
        self,
        vector: Vector | None,
        lexical: LexicalQuery,
        flt: SearchFilter,
        limit: int,
        offset: int,
        score_threshold: float | None,
        exclude_ids: Collection[str],
        diversity: float | None,
    ) -> list[Hit]:
        values = None if vector is None else vector_values(vector, self.dimension)
        terms = _sparse(lexical_terms(lexical.text))
        query_filter = _qdrant_filter(flt, exclude_ids)
        async with self._guard("search"):
            # Unfiltered: lexical scores are relative to the best match in the whole collection.
            best = await self._best_lexical_score(terms)
            if values is None and best is None:
                return []  # no product has any of the words
            scale = score_scale(values is not None, lexical, best)
            query, prefetch = _ranking(values, terms, lexical, best, query_filter)
            start, count = (0, DIVERSITY_CANDIDATES) if diversity else (offset, limit)
            response = await self._client.query_points(
                self._collection,
                query=query,
                using=LEXICAL_VECTOR if values is None else None,
                prefetch=prefetch,
                query_filter=query_filter,
                limit=count,
                offset=start,
                score_threshold=None if score_threshold is None else score_threshold / scale,
                with_payload=_HIT_PAYLOAD,
                with_vectors=[DENSE_VECTOR] if diversity else False,
            )
        points = response.points
        hits = [Hit(product_from_payload(p.payload or {}), p.score * scale) for p in points]
        if not diversity or not hits:
            return hits
        vectors = np.asarray([stored_vector(p.vector, self.dimension) for p in points], dtype=np.float32)
        order = mmr_order([h.score for h in hits], vectors, diversity, offset + limit)
        return [hits[i] for i in order[offset:]]

    async def _best_lexical_score(self, terms: models.SparseVector) -> float | None:
        if not terms.indices:
            return None
        response = await self._client.query_points(self._collection, query=terms, using=LEXICAL_VECTOR, limit=1)
        top = response.points
        return top[0].score if top and top[0].score > 0 else None

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, Vector]:
        """See VectorStore.vectors."""
        by_point = point_ids_by_product(product_ids)
        async with self._guard("vectors"):
            records = await self._client.retrieve(
                self._collection, list(by_point), with_payload=False, with_vectors=[DENSE_VECTOR]
            )
        return {by_point[str(r.id)]: stored_vector(r.vector, self.dimension) for r in records}

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """See VectorStore.facets."""
        query_filter = _qdrant_filter(flt, exclude_ids)

        async def count(field: str, wanted: bool) -> list[tuple[str, int]]:
            if not wanted:
                return []
            response = await self._client.facet(
                self._collection, field, facet_filter=query_filter, limit=FACET_SCAN_VALUES, exact=False
            )
            return [(str(hit.value), hit.count) for hit in response.hits]

        async with self._guard("facets"):
            categories, pairs = await asyncio.gather(
                count(CATEGORY, spec.categories), count(ATTRIBUTE_PAIRS, bool(spec.attribute_keys))
            )
        return facets_from_counts(spec, categories, pairs)

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """See VectorStore.scroll."""
        check_paging(limit, 0)
        offset = None if after is None else check_cursor(after)
        async with self._guard("scroll"):
            records, next_offset = await self._client.scroll(
                self._collection,
                scroll_filter=_qdrant_filter(flt),
                limit=limit,
                offset=offset,
                with_payload=_HIT_PAYLOAD,
                with_vectors=False,
            )
        products = [product_from_payload(r.payload or {}) for r in records]
        return products, None if next_offset is None else str(next_offset)

    async def count(self) -> int:
        """See VectorStore.count."""
        async with self._guard("count"):
            result = await self._client.count(self._collection, exact=True)
        return result.count

    async def ping(self) -> None:
        """See VectorStore.ping."""
        async with self._guard("ping"):
            exists = await self._client.collection_exists(self._collection)
        if not exists:
            raise StoreUnavailable(f"collection {self._collection!r} no longer exists at {self._where}")

    async def close(self) -> None:
        """Close the client; idempotent."""
        if not self._closed:
            self._closed = True
            await self._client.close()

    async def _prepare_collection(self, model_id: str) -> None:
        async with self._guard("open"):
            if not await self._client.collection_exists(self._collection):
                await self._create_collection(model_id)
            info = await self._client.get_collection(self._collection)
            self._check_compatible(info, model_id)
            for field, kind in INDEXED_FIELDS.items():
                if field not in info.payload_schema:
                    await self._client.create_payload_index(
                        self._collection, field, field_schema=_SCHEMA_TYPES[kind], wait=True
                    )
            if LEXICAL_VECTOR not in (info.config.params.sparse_vectors or {}):
                await self._client.create_vector_name(
                    self._collection,
                    LEXICAL_VECTOR,
                    models.SparseVectorNameConfig(sparse=models.SparseVectorConfig(modifier=models.Modifier.IDF)),
                    wait=True,
                )
            meta: Any = (info.config.metadata or {}).get(_META_KEY)
            recorded = meta.get("lexical") if isinstance(meta, dict) else None
        if recorded != LEXICAL_MODEL:
            await self._update_lexical_side(rederive=recorded is not None)
            async with self._guard("open"):
                record = {"model_id": model_id, "dimension": self.dimension, "lexical": LEXICAL_MODEL}
                await self._client.update_collection(self._collection, metadata={_META_KEY: record})

    async def _update_lexical_side(self, *, rederive: bool) -> None:
        # Each batch under its own deadline: a large collection takes longer than one call may.
        missing = None if rederive else models.Filter(must_not=[models.HasVectorCondition(has_vector=LEXICAL_VECTOR)])
        cursor: Any = None
        while True:
            async with self._guard("open (deriving the lexical side)"):
                records, cursor = await self._client.scroll(
                    self._collection,
                    scroll_filter=missing,
                    limit=_BACKFILL_BATCH,
                    offset=cursor,
                    with_payload=True,
                    with_vectors=False,
                )
                vectors = []
                for record in records:
                    terms = lexical_document(product_from_payload(record.payload or {}))
                    if terms is not None:  # a product without words stays without the vector
                        vectors.append(models.PointVectors(id=record.id, vector={LEXICAL_VECTOR: _sparse(terms)}))
                if vectors:
                    await self._client.update_vectors(self._collection, vectors, wait=True)
            if cursor is None:
                return

    async def _create_collection(self, model_id: str) -> None:
        try:
            await self._client.create_collection(
                self._collection,
                vectors_config=models.VectorParams(size=self.dimension, distance=models.Distance.COSINE),
                sparse_vectors_config={LEXICAL_VECTOR: _LEXICAL_PARAMS},
                metadata={_META_KEY: {"model_id": model_id, "dimension": self.dimension, "lexical": LEXICAL_MODEL}},
            )
        except (ApiException, grpc.RpcError):
            # Another replica starting at the same time may have created it first; that is fine.
            if not await self._client.collection_exists(self._collection):
                raise

    def _check_compatible(self, info: models.CollectionInfo, model_id: str) -> None:
        vectors = info.config.params.vectors
        wanted = f"model {model_id!r} with {self.dimension}-d cosine vectors"
        advice = "Use another collection name, or re-index the catalogue into a new collection."
        if not isinstance(vectors, models.VectorParams):
            raise StoreConfigError(
                f"collection {self._collection!r} at {self._where} uses named vectors; this server needs one "
                f"unnamed vector ({wanted}). {advice}"
            )
        if vectors.size != self.dimension or vectors.distance != models.Distance.COSINE:
            raise StoreConfigError(
                f"collection {self._collection!r} at {self._where} holds {vectors.size}-d "
                f"{vectors.distance.value} vectors, but this server uses {wanted}. {advice}"
            )
        meta: Any = (info.config.metadata or {}).get(_META_KEY)
        # A collection created by another tool has no record; only its vector size and distance can be checked.
        if isinstance(meta, dict) and meta.get("model_id") not in (None, model_id):
            raise StoreConfigError(
                f"collection {self._collection!r} at {self._where} was created for model {meta['model_id']!r}, "
                f"but this server uses {wanted}. {advice}"
            )

    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        # One place turns every way the server can fail into StoreUnavailable naming the server; the deadline
        # also covers calls the client itself would let hang (e.g. a gRPC channel still connecting).
        if self._closed:
            raise StoreUnavailable(f"the store for {self._where} is closed")
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except TimeoutError as exc:
            raise StoreUnavailable(f"Qdrant at {self._where}: {what} timed out after {self._timeout_s:g} s") from exc
        except grpc.aio.AioRpcError as exc:
            raise StoreUnavailable(
                f"Qdrant at {self._where}: {what} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        except (ApiException, grpc.RpcError, OSError) as exc:
            raise StoreUnavailable(f"Qdrant at {self._where}: {what} failed: {exc}") from exc


def _sparse(vector: qe.SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


def _point_vectors(values: list[float], product: Product) -> dict[str, Any]:
    return {name: _sparse(v) if name == LEXICAL_VECTOR else v for name, v in point_vectors(values, product).items()}


def _ranking(
    values: list[float] | None,
    terms: models.SparseVector,
    lexical: LexicalQuery,
    best: float | None,
    query_filter: models.Filter | None,
) -> tuple[models.Query | models.SparseVector, list[models.Prefetch] | None]:
    """The query (and prefetches) of a lexical or hybrid search, as in the embedded store (edge._ranking)."""
    if values is None:
        return terms, None
    dense = models.Prefetch(query=values, limit=HYBRID_CANDIDATES, filter=query_filter)
    words = models.Prefetch(query=terms, using=LEXICAL_VECTOR, limit=HYBRID_CANDIDATES, filter=query_filter)
    if lexical.fusion == "rank":
        return models.RrfQuery(rrf=models.Rrf(k=RRF_K)), [dense, words]
    rescored = models.Prefetch(prefetch=[words], query=values, limit=HYBRID_CANDIDATES, filter=query_filter)
    cosine_factor, lexical_factor = weighted_factors(lexical, best)
    cosine = models.MaxExpression(max=[DENSE_COSINE, RESCORED_COSINE])
    formula = models.SumExpression(
        sum=[
            models.MultExpression(mult=[cosine_factor, models.SumExpression(sum=[cosine, 1.0])]),
            models.MultExpression(mult=[lexical_factor, BM25_SCORE]),
        ]
    )
    return models.FormulaQuery(formula=formula, defaults=MISSING_SCORES), [dense, words, rescored]


def _qdrant_filter(flt: SearchFilter, exclude_ids: Collection[str] = ()) -> models.Filter | None:
    conditions: list[models.Condition] = []
    if flt.categories:
        conditions.append(models.FieldCondition(key=CATEGORY, match=models.MatchAny(any=list(flt.categories))))
    if flt.price_min is not None or flt.price_max is not None:
        conditions.append(models.FieldCondition(key=PRICE, range=models.Range(gte=flt.price_min, lte=flt.price_max)))
    for key, value in flt.attributes:
        conditions.append(
            models.FieldCondition(key=ATTRIBUTE_PAIRS, match=models.MatchValue(value=attribute_pair(key, value)))
        )
    excluded: list[models.Condition] = (
        [models.HasIdCondition(has_id=sorted(point_id_for(pid) for pid in exclude_ids))] if exclude_ids else []
    )
    if not (conditions or excluded):
        return None
    return models.Filter(must=conditions or None, must_not=excluded or None)
