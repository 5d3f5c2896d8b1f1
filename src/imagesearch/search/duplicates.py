"""Near-duplicate listings (FindDuplicates): products whose images nearly copy another product's.

Each image of a checked product is looked up among the stored images (the store matches a product by its best
image, and says which); products with an image at or above the threshold are its duplicates. Exact re-uploads are
told apart by the SHA-256 of the bytes each image was encoded from.
"""

from __future__ import annotations

import numpy as np

from imagesearch.domain import DuplicatesRequest, ListPage, Product, canonical_bytes, digest
from imagesearch.images import Duplicate, DuplicatesPage, ProductDuplicates
from imagesearch.search.catalog import Catalog
from imagesearch.search.paging import LIST_PAGE_TOKEN_FIELD, check_list_page, encode_list_page

#: Per image of a checked product, the nearest this many other products are looked at: far more than a listing
#: has copies in practice, and it bounds the work per image.
NEIGHBOURS_PER_IMAGE = 50
# The cosine of two identical unit vectors, computed in float32, can fall a few ulps short of 1: a copy must not
# miss a threshold of 1 (or any other) by rounding.
_TOLERANCE = 1e-6


async def find_duplicates(catalog: Catalog, request: DuplicatesRequest, page: ListPage | None) -> DuplicatesPage:
    """The checked products (one, or a page of those the filter admits) that have duplicates, each with them."""
    assert request.threshold is not None  # validation.duplicates_request applies the default
    request_digest = digest(canonical_bytes({"filter": request.flt.key_value(), "threshold": request.threshold}))[:32]
    if page is not None:
        check_list_page(page, request_digest, LIST_PAGE_TOKEN_FIELD)
    cursor: str | None = None
    if request.product_id:
        checked = [await catalog.get(request.product_id)]
    else:
        after = None if page is None else page.cursor
        checked, cursor = await catalog.store.scroll(request.flt, request.page_size, after)
    vectors = await catalog.store.image_vectors([product.id for product in checked])
    found = []
    for product in checked:
        duplicates = await _duplicates_of(
            catalog, product, vectors.get(product.id, np.empty((0, 0), np.float32)), request
        )
        if duplicates:
            found.append(ProductDuplicates(product.id, duplicates))
    token = "" if cursor is None else encode_list_page(ListPage(request_digest, cursor))
    return DuplicatesPage(found, token)


async def _duplicates_of(
    catalog: Catalog, product: Product, vectors: np.ndarray, request: DuplicatesRequest
) -> tuple[Duplicate, ...]:
    assert request.threshold is not None
    threshold = request.threshold - _TOLERANCE
    own_hashes = {image.sha256 for image in product.images if image.sha256}
    best: dict[str, Duplicate] = {}
    for index, vector in enumerate(vectors):
        hits = await catalog.store.search(
            vector,
            request.flt,
            NEIGHBOURS_PER_IMAGE,
            # The engine keeps scores strictly above its threshold; ours is "at least".
            score_threshold=float(np.nextafter(np.float32(threshold), np.float32(-1.0))),
            exclude_ids=(product.id,),
        )
        for hit in hits:
            known = best.get(hit.product.id)
            if hit.score < threshold or (known is not None and known.similarity >= hit.score):
                continue
            best[hit.product.id] = Duplicate(
                product_id=hit.product.id,
                similarity=min(hit.score, 1.0),
                image_index=index,
                duplicate_image_index=hit.matched_image or 0,
                exact=bool(own_hashes & {image.sha256 for image in hit.product.images}),
            )
    return tuple(sorted(best.values(), key=lambda d: (-d.similarity, d.product_id)))
