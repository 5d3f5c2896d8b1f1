"""Admission control for the RPCs that encode (Search, IndexProduct, IndexProducts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from imagesearch.errors import Overloaded


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
