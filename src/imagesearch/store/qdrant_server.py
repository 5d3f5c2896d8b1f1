"""The server backend: a Qdrant server or cluster through qdrant-client's async client (gRPC preferred).

A collection created before hybrid search gets its sparse lexical vector when the store opens: the vector name is
added to the collection (`create_vector_name`, Qdrant's API for an existing collection) and every point's BM25
terms are derived from its stored payload (`update_vectors`; the CLIP vectors are untouched). A collection created
before several images per product (or just now, with its unnamed vector) gets its `images` multivector the same
way, each point one image: its unnamed vector. Points that have the vector are skipped, so an interrupted update,
or two replicas starting at once, resume and repeat harmlessly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import qdrant_edge as qe
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ApiException

from imagesearch.domain import Facets, FacetSpec, Hit, Product, SearchFilter, point_id_for
from imagesearch.errors import StoreConfigError, StoreUnavailable
from imagesearch.store import layout
from imagesearch.store.base import VectorStore
from imagesearch.store.plan import Filter, search_filter
from imagesearch.store.qdrant_plan import HIT_PAYLOAD, qdrant_filter, query_points, sparse
from imagesearch.store.record import ImagesItem, PayloadRecord, StoreRecord, bring_up_to_date
from imagesearch.store.search_plan import SearchPlan, drive_async

# Collection metadata key under which the store keeps its record (store/record.py).
_META_KEY = "imagesearch"
_SCHEMA_TYPES = {"keyword": models.PayloadSchemaType.KEYWORD, "float": models.PayloadSchemaType.FLOAT}
_LEXICAL_PARAMS = models.SparseVectorParams(modifier=models.Modifier.IDF)
_MAXSIM = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
# Points whose lexical side or images are filled in per request while an older collection is brought up to date.
_BACKFILL_BATCH = 500
_ADVICE = "Use another collection name, or re-index the catalogue into a new collection."


class QdrantServerStore(VectorStore):
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
        self._guard = _Guard(where, timeout_s)
        # Serialises this process's writes so that the created/replaced flags cannot race each other. Writers in
        # other replicas can still race: then a flag may be wrong, never the stored data (upserts are idempotent).
        self._write_lock = asyncio.Lock()
        # The numeric attribute fields that have their index (layout.numeric_fields); new ones get it at upsert.
        self._numeric_indexed: set[str] = set()

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

    async def upsert(self, items: Sequence[tuple[Product, layout.Vector]]) -> list[bool]:
        """See VectorStore.upsert."""
        if not items:
            return []
        latest = {point_id_for(pid): item for pid, item in layout.last_per_id(items).items()}
        points = []
        for point_id, (product, vectors) in latest.items():
            named, payload = layout.point_parts(product, vectors, self.dimension)
            points.append(models.PointStruct(id=point_id, vector=_client_vectors(named), payload=payload))
        new_fields = layout.numeric_fields(product for product, _ in latest.values()) - self._numeric_indexed
        async with self._write_lock, self._guard("upsert"):
            for field in sorted(new_fields):  # idempotent: another replica may have created it first
                await self._client.create_payload_index(
                    self._collection, field, field_schema=models.PayloadSchemaType.FLOAT, wait=True
                )
                self._numeric_indexed.add(field)
            found = await self._client.retrieve(self._collection, list(latest), with_payload=False, with_vectors=False)
            await self._client.upsert(self._collection, points, wait=True)
        existing = {latest[str(record.id)][0].id for record in found}
        return layout.created_flags([product.id for product, _ in items], existing)

    async def get(self, product_id: str) -> Product | None:
        """See VectorStore.get."""
        async with self._guard("get"):
            records = await self._client.retrieve(self._collection, [point_id_for(product_id)], with_payload=True)
        if not records or records[0].payload is None:
            return None
        return layout.product_from_payload(records[0].payload)

    async def delete(self, product_id: str) -> bool:
        """See VectorStore.delete."""
        point_id = point_id_for(product_id)
        async with self._write_lock, self._guard("delete"):
            if not await self._client.retrieve(self._collection, [point_id], with_payload=False):
                return False
            await self._client.delete(self._collection, models.PointIdsList(points=[point_id]), wait=True)
        return True

    async def execute(self, plan: SearchPlan) -> list[Hit]:
        """See VectorStore.execute."""
        async with self._guard("search"):
            return await drive_async(plan, lambda request: query_points(self._client, self._collection, request))

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, layout.Vector]:
        """See VectorStore.vectors."""
        by_point = layout.point_ids_by_product(product_ids)
        async with self._guard("vectors"):
            records = await self._client.retrieve(
                self._collection, list(by_point), with_payload=False, with_vectors=[layout.DENSE_VECTOR]
            )
        return {by_point[str(r.id)]: layout.stored_vector(r.vector, self.dimension) for r in records}

    async def image_vectors(self, product_ids: Sequence[str]) -> dict[str, layout.Vector]:
        """See VectorStore.image_vectors."""
        by_point = layout.point_ids_by_product(product_ids)
        async with self._guard("image_vectors"):
            records = await self._client.retrieve(
                self._collection, list(by_point), with_payload=False, with_vectors=[layout.IMAGES_VECTOR]
            )
        found = ((by_point[str(r.id)], layout.stored_rows(r.vector, self.dimension)) for r in records)
        return {product_id: rows for product_id, rows in found if rows is not None}

    async def numeric_keys(self) -> list[str]:
        """See VectorStore.numeric_keys."""
        async with self._guard("numeric_keys"):
            response = await self._client.facet(
                self._collection, layout.NUMERIC_KEYS, limit=layout.FACET_SCAN_VALUES, exact=False
            )
        return sorted(str(hit.value) for hit in response.hits)

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """See VectorStore.facets."""
        query_filter = qdrant_filter(search_filter(flt, exclude_ids))

        async def count(field: str, wanted: bool) -> list[tuple[str, int]]:
            if not wanted:
                return []
            response = await self._client.facet(
                self._collection, field, facet_filter=query_filter, limit=layout.FACET_SCAN_VALUES, exact=False
            )
            return [(str(hit.value), hit.count) for hit in response.hits]

        async with self._guard("facets"):
            categories, pairs = await asyncio.gather(
                count(layout.CATEGORY, spec.categories), count(layout.ATTRIBUTE_PAIRS, bool(spec.attribute_keys))
            )
        return layout.facets_from_counts(spec, categories, pairs)

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """See VectorStore.scroll."""
        layout.check_paging(limit, 0)
        offset = None if after is None else layout.check_cursor(after)
        async with self._guard("scroll"):
            records, next_offset = await self._client.scroll(
                self._collection,
                scroll_filter=qdrant_filter(search_filter(flt)),
                limit=limit,
                offset=offset,
                with_payload=HIT_PAYLOAD,
                with_vectors=False,
            )
        products = [layout.product_from_payload(r.payload or {}) for r in records]
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
            raise StoreUnavailable(f"collection {self._collection!r} no longer exists at {self._guard.where}")

    async def close(self) -> None:
        """Close the client; idempotent."""
        if not self._guard.closed:
            self._guard.closed = True
            await self._client.close()

    async def _prepare_collection(self, model_id: str) -> None:
        async with self._guard("open"):
            if not await self._client.collection_exists(self._collection):
                await self._create_collection(model_id)
            info = await self._client.get_collection(self._collection)
            record = self._check_compatible(info, model_id)
            self._numeric_indexed = layout.numeric_fields_among(info.payload_schema)
            for field, kind in layout.INDEXED_FIELDS.items():
                if field not in info.payload_schema:
                    await self._client.create_payload_index(
                        self._collection, field, field_schema=_SCHEMA_TYPES[kind], wait=True
                    )
            if layout.LEXICAL_VECTOR not in (info.config.params.sparse_vectors or {}):
                await self._client.create_vector_name(
                    self._collection,
                    layout.LEXICAL_VECTOR,
                    models.SparseVectorNameConfig(sparse=models.SparseVectorConfig(modifier=models.Modifier.IDF)),
                    wait=True,
                )
            had_images = (
                isinstance(info.config.params.vectors, dict) and layout.IMAGES_VECTOR in info.config.params.vectors
            )
            if not had_images:
                images = models.DenseVectorConfig(
                    size=self.dimension, distance=models.Distance.COSINE, multivector_config=_MAXSIM
                )
                await self._client.create_vector_name(
                    self._collection, layout.IMAGES_VECTOR, models.DenseVectorNameConfig(dense=images), wait=True
                )
        where = self._guard.where
        if await bring_up_to_date(
            record, not had_images, self._scroll_payloads, self._set_lexical, self._set_images, self.dimension, where
        ):
            async with self._guard("open"):
                metadata = {_META_KEY: StoreRecord(model_id, self.dimension).as_mapping()}
                await self._client.update_collection(self._collection, metadata=metadata)

    async def _scroll_payloads(
        self, missing: Filter | None, cursor: Any, with_vector: bool
    ) -> tuple[Sequence[PayloadRecord], Any]:
        # Each page and each update under its own deadline: a large collection takes longer than one call may.
        async with self._guard("open (bringing the collection up to date)"):
            return await self._client.scroll(
                self._collection,
                scroll_filter=qdrant_filter(missing),
                limit=_BACKFILL_BATCH,
                offset=cursor,
                with_vectors=[layout.DENSE_VECTOR] if with_vector else False,
            )

    async def _set_lexical(self, vectors: list[tuple[Any, qe.SparseVector]]) -> None:
        points = [
            models.PointVectors(id=point_id, vector={layout.LEXICAL_VECTOR: sparse(terms)})
            for point_id, terms in vectors
        ]
        async with self._guard("open (deriving the lexical side)"):
            await self._client.update_vectors(self._collection, points, wait=True)

    async def _set_images(self, items: list[ImagesItem]) -> None:
        # The payloads first: a point counts as done once it has the vector (the backfill's filter).
        operations: list[models.UpdateOperation] = [
            models.SetPayloadOperation(set_payload=models.SetPayload(payload={layout.IMAGES: images}, points=[point]))
            for point, _, images in items
        ]
        vectors = [models.PointVectors(id=point, vector={layout.IMAGES_VECTOR: rows}) for point, rows, _ in items]
        operations.append(models.UpdateVectorsOperation(update_vectors=models.UpdateVectors(points=vectors)))
        async with self._guard("open (laying out the image vectors)"):
            await self._client.batch_update_points(self._collection, operations, wait=True)

    async def _create_collection(self, model_id: str) -> None:
        try:
            await self._client.create_collection(
                self._collection,
                vectors_config=models.VectorParams(size=self.dimension, distance=models.Distance.COSINE),
                sparse_vectors_config={layout.LEXICAL_VECTOR: _LEXICAL_PARAMS},
                metadata={_META_KEY: StoreRecord(model_id, self.dimension).as_mapping()},
            )
        except (ApiException, grpc.RpcError):
            # Another replica starting at the same time may have created it first; that is fine.
            if not await self._client.collection_exists(self._collection):
                raise

    def _check_compatible(self, info: models.CollectionInfo, model_id: str) -> StoreRecord | None:
        """The collection's record, once its vectors and record are checked against this server's model."""
        wanted = f"model {model_id!r} with {self.dimension}-d cosine vectors"
        place = f"collection {self._collection!r} at {self._guard.where}"
        configs = info.config.params.vectors
        # The unnamed vector alone (a collection from before several images per product), or it and `images`.
        named = configs if isinstance(configs, dict) else {layout.DENSE_VECTOR: configs}
        dense, images = named.get(layout.DENSE_VECTOR), named.get(layout.IMAGES_VECTOR)
        if dense is None or set(named) - {layout.DENSE_VECTOR, layout.IMAGES_VECTOR}:
            raise StoreConfigError(
                f"{place} has the vectors {sorted(named)}; this server needs an unnamed vector and "
                f"{layout.IMAGES_VECTOR!r} ({wanted}). {_ADVICE}"
            )
        for vectors in (dense, images):
            if vectors is not None and (vectors.size != self.dimension or vectors.distance != models.Distance.COSINE):
                raise StoreConfigError(
                    f"{place} holds {vectors.size}-d {vectors.distance.value} vectors, but this server uses "
                    f"{wanted}. {_ADVICE}"
                )
        if images is not None and images.multivector_config != _MAXSIM:
            raise StoreConfigError(
                f"{place} has {layout.IMAGES_VECTOR!r} vectors that are not MaxSim multivectors. {_ADVICE}"
            )
        meta: Any = (info.config.metadata or {}).get(_META_KEY)
        # A collection created by another tool has no record; only its vector size and distance can be checked.
        record = StoreRecord.from_mapping(meta) if isinstance(meta, dict) else None
        if record is not None:
            record.check(model_id, self.dimension, place, _ADVICE)
        return record


class _Guard:
    """`async with guard(what)`: one place turns every way the server can fail into StoreUnavailable naming the
    server; the deadline also covers calls the client itself would let hang (e.g. a gRPC channel still
    connecting)."""

    def __init__(self, where: str, timeout_s: float) -> None:
        self.where = where
        self.timeout_s = timeout_s
        self.closed = False

    @asynccontextmanager
    async def __call__(self, what: str) -> AsyncIterator[None]:
        if self.closed:
            raise StoreUnavailable(f"the store for {self.where} is closed")
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError as exc:
            raise StoreUnavailable(f"Qdrant at {self.where}: {what} timed out after {self.timeout_s:g} s") from exc
        except grpc.aio.AioRpcError as exc:
            raise StoreUnavailable(
                f"Qdrant at {self.where}: {what} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        except (ApiException, grpc.RpcError, OSError) as exc:
            raise StoreUnavailable(f"Qdrant at {self.where}: {what} failed: {exc}") from exc


def _client_vectors(named: dict[str, Any]) -> dict[str, Any]:
    return {name: sparse(v) if name == layout.LEXICAL_VECTOR else v for name, v in named.items()}
