"""Page tokens (search/paging.py) without a server: what a forged, truncated or foreign token gets, and the
paging depth limit. Fast; part of the mutation-testing selection (tools/mutation.sh)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from imagesearch.domain import ListPage, SearchPage
from imagesearch.errors import InvalidArgument
from imagesearch.search.paging import (
    LIST_PAGE_TOKEN_FIELD,
    MAX_SEARCH_DEPTH,
    SEARCH_PAGE_TOKEN_FIELD,
    CatalogueVersion,
    check_list_page,
    check_search_page,
    decode_list_page,
    decode_search_page,
    encode_list_page,
    encode_search_page,
)

FIELD = "query.page_token"
CURSOR = "0b5f4a8e-2c1d-4e3f-9a8b-7c6d5e4f3a2b"


def forge(data: Any, *, pad: bool = False) -> str:
    """A token the way a forger would make one: base64url of any JSON."""
    raw = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
    return raw if pad else raw.rstrip("=")


def violation_fields(error: InvalidArgument) -> list[str]:
    """The fields an error names. Each description continues "<field>: ", so it is lower-case prose."""
    for v in error.violations:
        assert isinstance(v.description, str) and v.description[:1].islower(), v
    return [v.field for v in error.violations]


def refused_fields(token: str, decode: Any = decode_search_page, field: str = FIELD) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        decode(token, field)
    return violation_fields(err.value)


def test_search_token_round_trips() -> None:
    page = SearchPage("digest", "s7", 40)
    token = encode_search_page(page)
    assert decode_search_page(token, FIELD) == page


def test_list_token_round_trips() -> None:
    page = ListPage("filter-digest", CURSOR)
    assert decode_list_page(encode_list_page(page), LIST_PAGE_TOKEN_FIELD) == page


def test_tokens_are_unpadded_base64url_of_compact_versioned_json() -> None:
    # Opaque to callers, but a token issued by one replica must decode on another running the next release, and
    # compact JSON (UTF-8, no spaces) keeps real tokens far below the length limit.
    token = encode_search_page(SearchPage("d\u00e9", "s1", 5))
    assert "=" not in token and "+" not in token and "/" not in token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw == '{"v":1,"q":"d\u00e9","g":"s1","o":5}'.encode()


def test_every_token_round_trips_whatever_its_length() -> None:
    # Unpadded base64 of every length modulo 4 that a token can have.
    pages = [SearchPage("d" * (i % 5), f"s{i % 7}", i) for i in range(1, 300)]
    assert {len(encode_search_page(page)) % 4 for page in pages} == {0, 2, 3}
    assert [decode_search_page(encode_search_page(page), FIELD) for page in pages] == pages


def test_token_from_an_earlier_release_still_decodes() -> None:
    assert decode_search_page(forge({"v": 1, "q": "d", "g": "s1", "o": 5}), FIELD) == SearchPage("d", "s1", 5)
    assert decode_search_page(forge({"v": 1, "q": "d", "g": "s1", "o": 5}, pad=True), FIELD).offset == 5
    cursor_token = forge({"v": 1, "f": "f", "c": CURSOR})
    assert decode_list_page(cursor_token, LIST_PAGE_TOKEN_FIELD) == ListPage("f", CURSOR)


@pytest.mark.parametrize("offset", [1, 2, MAX_SEARCH_DEPTH - 1])
def test_forged_offset_within_the_paging_limit_is_accepted(offset: int) -> None:
    # Forging one only gets a page the forger could have asked for.
    assert decode_search_page(forge({"v": 1, "q": "d", "g": "s1", "o": offset}), FIELD).offset == offset


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param(MAX_SEARCH_DEPTH, id="at-depth-limit"),
        pytest.param(MAX_SEARCH_DEPTH + 1, id="past-depth-limit"),
        pytest.param(10**30, id="huge"),
        pytest.param(True, id="bool"),
        pytest.param(5.0, id="float"),
        pytest.param("5", id="string"),
        pytest.param(None, id="null"),
    ],
)
def test_forged_offset_outside_the_paging_limit_is_refused(offset: Any) -> None:
    assert refused_fields(forge({"v": 1, "q": "d", "g": "s1", "o": offset})) == [FIELD]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"v": 1, "g": "s1", "o": 5}, id="no-digest"),
        pytest.param({"v": 1, "q": "d", "o": 5}, id="no-version"),
        pytest.param({"v": 1, "q": "d", "g": "s1"}, id="no-offset"),
        pytest.param({"v": 1, "q": 7, "g": "s1", "o": 5}, id="digest-not-string"),
        pytest.param({"v": 1, "q": "d", "g": 7, "o": 5}, id="version-not-string"),
        pytest.param({"v": 2, "q": "d", "g": "s1", "o": 5}, id="future-format"),
        pytest.param({"q": "d", "g": "s1", "o": 5}, id="no-format"),
        pytest.param({"v": "1", "q": "d", "g": "s1", "o": 5}, id="format-as-string"),
    ],
)
def test_forged_search_token_with_bad_fields_is_refused(data: dict[str, Any]) -> None:
    assert refused_fields(forge(data)) == [FIELD]


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("WzFd", id="json-list"),  # base64 of [1]: valid JSON, not an object
        pytest.param(forge("text"), id="json-string"),
        pytest.param(forge(5), id="json-number"),
        pytest.param(forge(None), id="json-null"),
        pytest.param("not a token!", id="not-base64"),
        pytest.param("abcde", id="bad-base64-length"),
        pytest.param(base64.urlsafe_b64encode(b"\xff\xfe{").decode(), id="not-utf8"),
        pytest.param(base64.urlsafe_b64encode(b"{not json").decode(), id="not-json"),
        pytest.param("", id="empty"),
    ],
)
def test_token_that_is_not_a_json_object_is_refused_not_internal(token: str) -> None:
    # Every refusal is an InvalidArgument naming the caller's field; anything else would be INTERNAL.
    assert refused_fields(token) == [FIELD]
    assert refused_fields(token, decode_list_page, LIST_PAGE_TOKEN_FIELD) == [LIST_PAGE_TOKEN_FIELD]


def test_token_longer_than_any_real_token_is_refused_before_decoding() -> None:
    def token_of_length(length: int) -> str:
        # A well-formed token grown to `length` characters through its digest.
        for digest_chars in range(length):
            token = encode_search_page(SearchPage("d" * digest_chars, "s1", 5))
            if len(token) >= length:
                return token
        raise AssertionError("unreachable")

    at_limit = token_of_length(1024)
    assert len(at_limit) == 1024
    assert decode_search_page(at_limit, FIELD).offset == 5
    over = token_of_length(1026)
    assert len(over) == 1026
    assert refused_fields(over) == [FIELD]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"v": 1, "c": CURSOR}, id="no-digest"),
        pytest.param({"v": 1, "f": "f"}, id="no-cursor"),
        pytest.param({"v": 1, "f": 1, "c": CURSOR}, id="digest-not-string"),
        pytest.param({"v": 1, "f": "f", "c": 7}, id="cursor-not-string"),
        pytest.param({"v": 1, "f": "f", "c": "not-a-uuid"}, id="cursor-not-uuid"),
        pytest.param({"v": 2, "f": "f", "c": CURSOR}, id="future-format"),
    ],
)
def test_forged_list_token_is_refused(data: dict[str, Any]) -> None:
    assert refused_fields(forge(data), decode_list_page, LIST_PAGE_TOKEN_FIELD) == [LIST_PAGE_TOKEN_FIELD]


def test_list_cursor_is_normalised_to_a_point_id() -> None:
    page = decode_list_page(forge({"v": 1, "f": "f", "c": "{" + CURSOR.upper() + "}"}), LIST_PAGE_TOKEN_FIELD)
    assert page.cursor == CURSOR
    assert str(uuid.UUID(page.cursor)) == page.cursor


def test_search_token_is_checked_against_query_and_catalogue_version() -> None:
    page = SearchPage("digest", "s3", 10)
    check_search_page(page, "digest", "s3", SEARCH_PAGE_TOKEN_FIELD)  # the same query, the same catalogue
    for digest, version in (("other", "s3"), ("digest", "s4"), ("other", "s4")):
        with pytest.raises(InvalidArgument) as err:
            check_search_page(page, digest, version, SEARCH_PAGE_TOKEN_FIELD)
        assert violation_fields(err.value) == [SEARCH_PAGE_TOKEN_FIELD]


def test_list_token_is_checked_against_the_filter() -> None:
    page = ListPage("filter", CURSOR)
    check_list_page(page, "filter", LIST_PAGE_TOKEN_FIELD)
    with pytest.raises(InvalidArgument) as err:
        check_list_page(page, "another filter", LIST_PAGE_TOKEN_FIELD)
    assert violation_fields(err.value) == [LIST_PAGE_TOKEN_FIELD]


def test_shared_catalogue_version_is_the_cache_generation() -> None:
    first, second = CatalogueVersion(shared=True), CatalogueVersion(shared=True)
    assert first.current(4) == second.current(4) == "s4"  # any replica accepts the other's tokens
    assert first.current(5) != first.current(4)
    first.bump()  # local writes do not matter: the generation is bumped by every replica
    assert first.current(4) == "s4"


def test_unshared_or_unknown_generation_gives_a_version_of_this_process_and_its_writes() -> None:
    for shared in (False, True):
        version, other_process = CatalogueVersion(shared=shared), CatalogueVersion(shared=shared)
        generation = None if shared else 4  # an unshared cache's generation counts this process only
        before = version.current(generation)
        assert version.current(generation) == before  # stable while nothing is written
        assert before != other_process.current(generation)  # another replica (or a restart) refuses it
        assert not before.startswith("s")
        version.bump()
        after = version.current(generation)
        assert after != before
        version.bump()
        assert version.current(generation) not in (before, after)
