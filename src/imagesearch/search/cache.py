"""Caching of query encodings and search results.

Two layers:
- `CacheBackend`: a byte store with TTLs and one counter (in-process LRU, Redis, or none). Backends never raise:
  a backend that cannot answer behaves as a miss, so the cache can never fail a search.
- `SearchCache`: the service's view: keys, value formats and the catalogue generation.

Tier 1 (encodings): key = digest(model id, kind, content) -> the embedding as raw little-endian float32 bytes.
Tier 2 (results): key = digest(model id, embedding bytes, the query's fingerprint (domain.Query.fingerprint, the
same one its page tokens are bound to), the page (offset, count), generation) -> the ranked hits with whole
products (JSON), so a hit skips both the model and the store. Tier 1 is shared by the modes: dense and hybrid
searches encode the same text to the same vector. Keys are built with domain.digest and domain.canonical_bytes
only, so two different queries can never share an entry.
The catalogue generation is a counter bumped after every successful write to the store; it is part of every
result key, so a result cached before a change can never be served after it (no TTL-only staleness).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from imagesearch.domain import (
    CacheDescription,
    Hit,
    Modality,
    Product,
    Query,
    canonical_bytes,
    digest,
)
from imagesearch.images import NormalizedBox
from imagesearch.ranking import ScoreExplanation

# Bump when a value format changes, so old entries are never misread by a new server. A change in what a key is
# made of needs no bump: the new digests miss the old entries, which expire. A bump also moves the generation
# counter, so during a rolling update the two versions would not see each other's writes.
KEY_VERSION = "v3"
# Backends whose counters every replica sees; the others (in-process) count this process's writes only.
_SHARED_BACKENDS = frozenset({"redis"})


class CacheBackend(Protocol):
    """A byte store with TTLs and an integer counter. Implementations never raise on get/set/incr."""

    name: str

    @property
    def available(self) -> bool:
        """False while the backend cannot be reached (every call then misses)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value, or None on a miss or when unavailable."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store a value; ttl_s 0 means no expiry. Best effort."""
        ...

    async def get_counter(self, key: str) -> int | None:
        """The counter's value (0 if never bumped), or None when unavailable."""
        ...

    async def incr(self, key: str) -> None:
        """Bump a counter. Best effort."""
        ...

    async def close(self) -> None: ...


class NoCache:
    """Caching disabled: every lookup misses."""

    name = "none"
    available = False

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        return None

    async def get_counter(self, key: str) -> int | None:
        return None

    async def incr(self, key: str) -> None:
        return None

    async def close(self) -> None:
        return None


class LruCache:
    """In-process LRU bounded by entry count (TTLs are not needed: the generation keeps results fresh and
    embeddings of a fixed model never go stale)."""

    name = "memory"
    available = True

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._counters: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get_counter(self, key: str) -> int | None:
        return self._counters.get(key, 0)

    async def incr(self, key: str) -> None:
        self._counters[key] = self._counters.get(key, 0) + 1

    async def close(self) -> None:
        self._entries.clear()


@dataclass
class CacheStats:
    embedding_hits: int = 0
    embedding_misses: int = 0
    result_hits: int = 0
    result_misses: int = 0


@dataclass(frozen=True)
class ResultKey:
    """Everything a ranked page depends on besides the catalogue generation: the query, the vector its text or
    image was encoded to (None for a search by example products only, or a lexical one), and the page: `count`
    hits from `offset` on. Example products enter by id, which with the generation pins their stored vectors."""

    query: Query
    vector: np.ndarray | None
    offset: int
    count: int


class SearchCache:
    """The two cache tiers and the catalogue generation over one backend."""

    def __init__(
        self, backend: CacheBackend, *, model_id: str, embedding_ttl_s: int, result_ttl_s: int, namespace: str = ""
    ) -> None:
        self.backend = backend
        self.stats = CacheStats()
        self._model_id = model_id
        self._embedding_ttl_s = embedding_ttl_s
        self._result_ttl_s = result_ttl_s
        # e.g. "imagesearch:v3:" or "imagesearch:v3:staging:" -- two deployments sharing a Redis never collide.
        self._prefix = f"imagesearch:{KEY_VERSION}:{namespace + ':' if namespace else ''}"
        self._generation_key = self._prefix + "generation"

    @property
    def enabled(self) -> bool:
        return self.backend.available

    def describe(self) -> CacheDescription:
        return CacheDescription(backend=self.backend.name, available=self.backend.available, **vars(self.stats))

    def embedding_key(self, kind: Modality, content: bytes, region: NormalizedBox | None = None) -> str:
        """The tier-1 key of `content` encoded whole, or of its `region` (a separate part of the digest, so no
        image's bytes can spell another image with a box)."""
        parts = [self._model_id.encode(), kind.encode(), content]
        if region is not None:
            parts.append(canonical_bytes(region.key_value()))
        return f"{self._prefix}emb:{digest(*parts)}"

    async def get_embedding(self, key: str, dimension: int) -> np.ndarray | None:
        raw = await self.backend.get(key)
        vector = _decode_vector(raw, dimension)
        if vector is None:
            self.stats.embedding_misses += 1
        else:
            self.stats.embedding_hits += 1
        return vector

    async def put_embedding(self, key: str, vector: np.ndarray) -> None:
        await self.backend.set(key, np.asarray(vector, dtype="<f4").tobytes(), self._embedding_ttl_s)

    def result_key(self, generation: int, key: ResultKey) -> str:
        """The tier-2 key for this query at catalogue `generation` (read with `generation()`; when that is None,
        the backend is unavailable and results must not be cached or served)."""
        vector = b"" if key.vector is None else np.asarray(key.vector, dtype="<f4").tobytes()
        ranking = {"query": key.query.fingerprint(), "offset": key.offset, "count": key.count, "generation": generation}
        return f"{self._prefix}res:{digest(self._model_id.encode(), vector, canonical_bytes(ranking))}"

    async def generation(self) -> int | None:
        """The catalogue generation (bumped by every write); None when the backend is unavailable."""
        return await self.backend.get_counter(self._generation_key)

    @property
    def shared(self) -> bool:
        """True when the generation is shared by every replica using this cache (Redis), not process-local."""
        return self.backend.name in _SHARED_BACKENDS

    async def get_results(self, key: str) -> list[Hit] | None:
        hits = _decode_hits(await self.backend.get(key))
        if hits is None:
            self.stats.result_misses += 1
        else:
            self.stats.result_hits += 1
        return hits

    async def put_results(self, key: str, hits: list[Hit]) -> None:
        await self.backend.set(key, _encode_hits(hits), self._result_ttl_s)

    async def bump_generation(self) -> None:
        """Call after every successful catalogue write: all cached results become unreachable."""
        await self.backend.incr(self._generation_key)

    async def close(self) -> None:
        await self.backend.close()


def _decode_vector(raw: bytes | None, dimension: int) -> np.ndarray | None:
    # A value of the wrong length (corruption, another model's entry) is a miss, never an error.
    if raw is None or len(raw) != 4 * dimension:
        return None
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return vector if np.all(np.isfinite(vector)) else None


def _encode_hits(hits: list[Hit]) -> bytes:
    rows = [
        [
            h.score,
            h.product.to_row(),
            h.matched_image,
            list(h.duplicates),
            None if h.explanation is None else h.explanation.to_row(),
        ]
        for h in hits
    ]
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()


def _decode_hit(score: Any, product: Any, matched: Any, duplicates: Any, explanation: Any) -> Hit:
    return Hit(
        product=Product.from_row(product),
        score=float(score),
        matched_image=None if matched is None else int(matched),
        duplicates=tuple(str(d) for d in duplicates),
        explanation=None if explanation is None else ScoreExplanation.from_row(explanation),
    )


def _decode_hits(raw: bytes | None) -> list[Hit] | None:
    if raw is None:
        return None
    try:
        rows: Any = json.loads(raw)
        if not isinstance(rows, list):
            return None  # e.g. an empty JSON object, which would read as no hits
        return [_decode_hit(*row) for row in rows]
    except (ValueError, TypeError, AttributeError):
        # Corrupted or foreign value: treat as a miss.
        return None
