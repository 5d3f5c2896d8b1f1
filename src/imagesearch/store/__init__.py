"""Vector stores: the interface the handlers depend on, and its two backends."""

from imagesearch.store.base import VectorStore
from imagesearch.store.edge import EdgeStore
from imagesearch.store.qdrant_server import QdrantServerStore

__all__ = ["EdgeStore", "QdrantServerStore", "VectorStore"]
