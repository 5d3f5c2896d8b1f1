"""Page tokens for Search and ListProducts, and the catalogue version that Search tokens are bound to.

A token is opaque to callers (base64url of a small JSON object) and carries no secret: forging one only gets
the forger a page they could have asked for, and every field is checked on the way in (an offset beyond the
paging limit, a cursor that is not a point id, a malformed token: INVALID_ARGUMENT on the token's field).

Search tokens are offsets into one ranking, so they are bound to
- the query: `Query.digest`, its fingerprint (everything that shapes the ranking, the same form its result-cache
  key is built from) and its page size, so a token cannot be replayed with another query, and
- the catalogue version at the first page, so that pages never mix two states of the catalogue (a product
  moving between pages would be shown twice or never).

ListProducts tokens are keyset cursors (the next point id), stable under writes, so they bind the filter only.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import uuid
from typing import Any

from imagesearch.domain import ListPage, SearchPage
from imagesearch.errors import FieldViolation, InvalidArgument

# The request fields that carry the tokens, as violations name them.
SEARCH_PAGE_TOKEN_FIELD = "query.page_token"
LIST_PAGE_TOKEN_FIELD = "page_token"

#: Search pages reach at most this many results (hits, or families with group_by); then next_page_token is empty.
MAX_SEARCH_DEPTH = 1000

_VERSION = 1
# Real tokens are about 150 characters; anything far longer is not one of ours and is not worth decoding.
_MAX_TOKEN_CHARS = 1024


class CatalogueVersion:
    """Which state of the catalogue a page was computed from.

    With a shared cache (Redis), its generation counter: every replica bumps it after every write, so a token
    works on any replica and is refused once any replica has changed the catalogue. Otherwise (in-process cache,
    no cache, or Redis unreachable) a process-local counter that this process's catalogue writes bump, tagged
    with a random id of this process: a token then works only on the replica that issued it (another replica,
    or this one after a restart, refuses it rather than risk a stale page), and writes made through other
    replicas sharing a Qdrant server go unnoticed, as they do for an in-process result cache.
    """

    def __init__(self, *, shared: bool) -> None:
        # Whether the cache's generation is seen by every replica (SearchCache.shared).
        self._shared = shared
        self._process = secrets.token_hex(8)
        self._local_writes = 0

    def bump(self) -> None:
        """Call after every successful catalogue write."""
        self._local_writes += 1

    def current(self, generation: int | None) -> str:
        """The version now, given the cache's generation as just read (None when unknown)."""
        if self._shared and generation is not None:
            return f"s{generation}"
        return f"p{self._process}.{self._local_writes}"


def encode_search_page(page: SearchPage) -> str:
    return _encode({"q": page.query_digest, "g": page.catalogue_version, "o": page.offset})


def decode_search_page(token: str, field: str) -> SearchPage:
    data = _decode(token, field)
    digest, version, offset = data.get("q"), data.get("g"), data.get("o")
    if not (
        isinstance(digest, str)
        and isinstance(version, str)
        and type(offset) is int  # not bool
        and 0 < offset < MAX_SEARCH_DEPTH
    ):
        raise _malformed(field)
    return SearchPage(digest, version, offset)


def encode_list_page(page: ListPage) -> str:
    return _encode({"f": page.filter_digest, "c": page.cursor})


def decode_list_page(token: str, field: str) -> ListPage:
    data = _decode(token, field)
    digest, cursor = data.get("f"), data.get("c")
    if not (isinstance(digest, str) and isinstance(cursor, str)):
        raise _malformed(field)
    try:
        cursor = str(uuid.UUID(cursor))  # cursors are store point ids, always UUIDs
    except ValueError:
        raise _malformed(field) from None
    return ListPage(digest, cursor)


def check_search_page(page: SearchPage, query_digest: str, catalogue_version: str, field: str) -> None:
    if page.query_digest != query_digest:
        raise InvalidArgument(
            FieldViolation(field, "was issued for another query: send the first page's query unchanged with it")
        )
    if page.catalogue_version != catalogue_version:
        raise InvalidArgument(
            FieldViolation(
                field,
                "has expired: the catalogue changed since it was issued (or it came from another server); "
                "search again from the first page, without page_token",
            )
        )


def check_list_page(page: ListPage, filter_digest: str, field: str) -> None:
    if page.filter_digest != filter_digest:
        raise InvalidArgument(FieldViolation(field, "was issued for another filter: send the same filter with it"))


def _encode(data: dict[str, Any]) -> str:
    raw = json.dumps({"v": _VERSION, **data}, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str, field: str) -> dict[str, Any]:
    if len(token) > _MAX_TOKEN_CHARS:
        raise _malformed(field)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _malformed(field) from None
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        raise _malformed(field)
    return data


def _malformed(field: str) -> InvalidArgument:
    return InvalidArgument(
        FieldViolation(field, "is not a page token from this service: pass next_page_token back unchanged")
    )
