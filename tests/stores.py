"""Helpers of the tests that drive a vector store directly: small hand-made vectors, and either backend opened on
its own (no server, no model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from imagesearch.domain import Product
from imagesearch.images import ProductImage
from imagesearch.store import VectorStore
from imagesearch.store.base import Vector
from imagesearch.store.edge import EdgeStore
from imagesearch.store.qdrant_server import QdrantServerStore

DIM = 8
MODEL = "test-model"


def unit(*values: float) -> Vector:
    """A normalised DIM-d vector whose leading components are `values`."""
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return (v / np.linalg.norm(v)).astype(np.float32)


def stored(product: Product) -> Product:
    """`product` as a store reads it back: a product written without `images` has one, its image_url."""
    return product if product.images else dataclasses.replace(product, images=(ProductImage(url=product.image_url),))


async def open_store(backend: str, tmp_path: Path, dimension: int = DIM, model_id: str = MODEL) -> VectorStore:
    if backend == "embedded":
        return await EdgeStore.open(tmp_path / "edge", dimension, model_id)
    # ":memory:" is qdrant-client's in-process local mode. It exercises this store's qdrant-client code path
    # (requests, filters, payload layout, error handling) because no Qdrant server can run here.
    return await QdrantServerStore.open(None, dimension, model_id, location=":memory:")
