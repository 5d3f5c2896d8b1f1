"""The vector store interface: the VectorStore protocol, which both backends subclass (for its one `search`).

The point layout both share is in store/layout.py, the search algorithm in store/search_plan.py (over the
vocabulary of store/plan.py). The names that other layers and the tests import from this module are re-exported
here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from imagesearch.domain import Facets, FacetSpec, Hit, LexicalQuery, Product, SearchFilter
from imagesearch.ranking import RankingSpec
from imagesearch.store.layout import CATEGORY as CATEGORY
from imagesearch.store.layout import LEXICAL_MODEL as LEXICAL_MODEL
from imagesearch.store.layout import LEXICAL_VECTOR as LEXICAL_VECTOR
from imagesearch.store.layout import PRICE as PRICE
from imagesearch.store.layout import Vector as Vector
from imagesearch.store.layout import check_paging, vector_values
from imagesearch.store.layout import product_to_payload as product_to_payload
from imagesearch.store.plan import search_filter
from imagesearch.store.ranking_formula import rule_formula
from imagesearch.store.search_plan import DIVERSITY_CANDIDATES as DIVERSITY_CANDIDATES
from imagesearch.store.search_plan import SearchPlan


class VectorStore(Protocol):
    """Where product embeddings and metadata live; the handlers depend on this, never on a backend.

    Vectors passed in are float32, L2-normalised, of shape (dimension,) (a product's images: (images, dimension));
    any other shape is a programming error (ValueError). Backend failures raise `StoreUnavailable`; an incompatible
    existing store raises `StoreConfigError` when it is opened.
    """

    backend: str
    """Which backend this is: "embedded" (Qdrant Edge, in-process) or "qdrant" (a Qdrant server or cluster)."""

    dimension: int
    """Length of every stored vector."""

    async def upsert(self, items: Sequence[tuple[Product, Vector]]) -> list[bool]:
        """Insert or replace products with their embeddings: per product, one row per image of `product.images`, in
        order, shape (images, dimension); or shape (dimension,) for a product of one image. A product without
        `images` has one, its `image_url` (it reads back so). A product is one point: replacing it replaces all its
        images in one write, so no search sees half of the new set. A row count that does not match the images is
        a ValueError.

        Returns one flag per item: True if the product was created, False if it replaced an existing one. When the
        same product id appears twice in `items`, the last one wins (and reports False).
        """
        ...

    async def get(self, product_id: str) -> Product | None:
        """The stored product, or None if there is none with this id."""
        ...

    async def delete(self, product_id: str) -> bool:
        """Remove a product; False if it did not exist."""
        ...

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
        collapse: float | None = None,
        ranking: RankingSpec | None = None,
        explain: bool = False,
    ) -> list[Hit]:
        """The best matches among the products matching `flt`, best first.

        A product is matched by its best image: its cosine similarity to `vector` is that of the image closest to
        it, and `Hit.matched_image` says which (its position in `product.images`; None without `vector`).

        Dense (`vector` only): by cosine similarity to `vector`; the score is that similarity (-1 to 1).
        Lexical (`lexical` only): by BM25 of `lexical.text` against each product's words; the score is that BM25
        divided by the best BM25 any product of the collection reaches for this text (0 to 1), so that a filter
        never changes a score. A text with no indexable word (only stop words) matches nothing.
        Hybrid (both): the HYBRID_CANDIDATES best of each side, fused. `lexical.fusion` "weighted": the score is
        (1 - w) * (1 + cosine) / 2 + w * lexical score (w = `lexical.weight`; 0 to 1), with every candidate's own
        cosine, so that a filter never changes a score either. "rank": reciprocal rank fusion, RRF_SCALE * sum
        of 1 / (RRF_K + rank) over the two rankings (0 to 1; 1 for a product first in both), ranks taken among
        the products matching `flt`.

        `offset` skips that many best hits (paging: page n is offset=n*limit). Hits scoring at or below
        `score_threshold` (in the score's own scale) are dropped (Qdrant keeps only scores strictly above it).
        Products in `exclude_ids` are never returned.

        `diversity` in (0, 1] re-ranks the DIVERSITY_CANDIDATES best matches by Maximal Marginal Relevance with
        lambda = 1 - diversity: each next hit maximises lambda * relevance - (1 - lambda) *
        max_similarity_to_hits_before_it, where relevance is the score and similarity the cosine between the
        images by which the products matched (`matched_image`; the primary images without `vector`). `offset` then
        applies to the re-ranked list; scores stay those of the plain ranking. None or 0: plain ranking.

        `collapse` in (0, 1] collapses near-duplicate listings among the DIVERSITY_CANDIDATES best matches, greedily
        from the top: a hit with an image whose cosine with an image of an earlier kept hit is at least `collapse`
        is dropped, and its product id added to that kept hit's `duplicates` (the first such hit). `offset` then
        applies to the kept hits (with `diversity`: re-ranked by MMR after collapsing), so a collapsing search
        returns at most DIVERSITY_CANDIDATES hits over all pages.

        `ranking`: business rules (ranking.py) reorder the `ranking.candidates` best matches by relevance (the
        score without rules; `score_threshold` applies to it): the score becomes relevance * product over MULTIPLY
        rules of (1 + w * f) + sum over ADD rules of w * f (store/ranking_formula.py). Paging, diversity and
        collapsing work within those candidates. None or no rules: relevance alone.

        `explain`: each hit's `explanation`: its relevance, the cosine of its matched image with `vector` (None
        without `vector`) and each rule's f and w * f.

        Raises ValueError when neither `vector` nor `lexical` is given, or `collapse` is outside (0, 1].

        Written once for every backend: the arguments become a SearchPlan (store/search_plan.py), which the backend
        runs.
        """
        check_paging(limit, offset)
        if vector is None and lexical is None:
            raise ValueError("a search needs a vector, a lexical query or both")
        if collapse is not None and not 0.0 < collapse <= 1.0:
            raise ValueError(f"a collapse threshold is in (0, 1], got {collapse}")
        values = None if vector is None else vector_values(vector, self.dimension)
        matching = search_filter(flt, exclude_ids)
        rules = rule_formula(ranking) if ranking is not None and ranking.rules else None
        return await self.execute(
            SearchPlan(
                self.dimension,
                values,
                lexical,
                matching,
                limit,
                offset,
                score_threshold,
                diversity or None,
                collapse,
                rules,
                explain,
            )
        )

    async def execute(self, plan: SearchPlan) -> list[Hit]:
        """The hits of `plan`: its requests run against one consistent state of the store (see SearchPlan.steps).
        A backend's part of `search`; callers use `search`."""
        ...

    async def vectors(self, product_ids: Sequence[str]) -> dict[str, Vector]:
        """The stored embeddings of the primary images (the first of each product) of those of `product_ids` that
        exist (unknown ids are absent), by product id."""
        ...

    async def image_vectors(self, product_ids: Sequence[str]) -> dict[str, Vector]:
        """The stored embeddings of every image of those of `product_ids` that exist, by product id: shape
        (images, dimension), in the order of `product.images`. Unknown ids are absent."""
        ...

    async def numeric_keys(self) -> list[str]:
        """The numeric attribute keys (`Product.numeric_attributes`) that some stored product has, sorted. Counted
        as `facets` counts (its fast mode), from the `numeric_keys` keyword index."""
        ...

    async def facets(self, flt: SearchFilter, spec: FacetSpec, *, exclude_ids: Collection[str] = ()) -> Facets:
        """Counts of products per category and per requested attribute value, among the products matching `flt`
        except `exclude_ids`. Values are sorted by count (descending), then value; at most `spec.max_values` per
        facet, found among the FACET_SCAN_VALUES most frequent values of the field.

        Counts come from Qdrant's fast facet mode (`exact=False`), which counts every segment's matching points
        in full: exact, except that a point being rewritten (present in two segments for a moment, e.g. during
        an optimisation) can count twice. The `exact=True` mode runs one count per distinct value, which is
        prohibitive for attribute_pairs (about 1 s at 100k products with a family id per product)."""
        ...

    async def scroll(self, flt: SearchFilter, limit: int, after: str | None = None) -> tuple[list[Product], str | None]:
        """Up to `limit` products matching `flt`, in the store's stable point order, starting at cursor `after`
        (None: the beginning). Returns them and the cursor of the next page (None after the last page).

        Cursors are point ids, so paging is keyset-based: stable while products are added or removed. A cursor
        that is not a point id of this store layout raises ValueError.
        """
        ...

    async def count(self) -> int:
        """Number of stored products."""
        ...

    async def ping(self) -> None:
        """A cheap probe for health checks; raises StoreUnavailable if the backend is not usable."""
        ...

    async def close(self) -> None:
        """Release the backend (flushing what the backend buffers). Idempotent; later calls raise StoreUnavailable."""
        ...
