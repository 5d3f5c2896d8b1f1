"""The scope table and the keys file, without a server (tests/test_security.py drives the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesearch.api.auth import (
    SCOPES,
    ApiKeyFileError,
    MissingScopeError,
    _required_scopes,
    load_api_keys,
    required_scope,
)
from imagesearch.v1 import image_search_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ImageSearchService"]


def test_every_rpc_of_the_descriptor_has_a_scope() -> None:
    for method in SERVICE.methods:
        assert required_scope(f"/{SERVICE.full_name}/{method.name}") in ("read", "write"), method.name


def test_scope_table_without_an_rpc_is_refused() -> None:
    for name in SCOPES:
        incomplete = {other: scope for other, scope in SCOPES.items() if other != name}
        with pytest.raises(MissingScopeError, match=name):
            _required_scopes(SERVICE, incomplete)


def test_scope_table_naming_an_unknown_rpc_is_refused() -> None:
    with pytest.raises(MissingScopeError, match="Renamed"):
        _required_scopes(SERVICE, {**SCOPES, "Renamed": "read"})


@pytest.mark.parametrize(
    ("method", "protect_all", "needed"),
    [
        ("/grpc.health.v1.Health/Check", False, "open"),
        ("/grpc.health.v1.Health/Watch", False, "open"),
        ("/grpc.health.v1.Health/List", False, "open"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False, "open"),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False, "open"),
        ("/grpc.health.v1.Health/Check", True, "read"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, "read"),
        ("/imagesearch.v1.ImageSearchService/Search", True, "read"),
        ("/imagesearch.v1.ImageSearchService/DeleteProduct", True, "write"),
        ("/imagesearch.v1.ImageSearchService/Nope", False, "refused"),
        ("/imagesearch.v1.ImageSearchService/search", False, "refused"),
        ("/imagesearch.v1.Internal/Search", False, "refused"),
        ("/grpc.health.v1.HealthX/Check", False, "refused"),
        ("/grpc.health.v1/Health/Check", False, "refused"),
        ("grpc.health.v1.Health/Check", False, "refused"),
        ("", False, "refused"),
    ],
)
def test_required_scope_is_closed_by_default(method: str, protect_all: bool, needed: str) -> None:
    assert required_scope(method, protect_all=protect_all) == needed


def test_keys_file_with_comments_and_both_scopes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# header\n\nread  aaaaaaaaaaaaaaaa\n  write bbbbbbbbbbbbbbbb # indexer\n")
    keys = load_api_keys(path)
    assert [(k.scope, k.secret) for k in keys] == [("read", b"aaaaaaaaaaaaaaaa"), ("write", b"bbbbbbbbbbbbbbbb")]
    assert all(len(k.key_id) == 8 and k.key_id not in k.secret.decode() for k in keys)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing-file"),
        pytest.param("", id="empty-file"),
        pytest.param("# nothing\n", id="comments-only"),
        pytest.param("admin aaaaaaaaaaaaaaaa\n", id="unknown-scope"),
        pytest.param("READ aaaaaaaaaaaaaaaa\n", id="scope-case"),
        pytest.param("read\n", id="no-key"),
        pytest.param("read aaaaaaaaaaaaaaaa extra\n", id="three-fields"),
        pytest.param("read aaaaaaaaaaaaaaa\n", id="short-key"),
        pytest.param("read aaaaaaaaaaaaaaaa\nbad line\n", id="bad-second-line"),
    ],
)
def test_bad_keys_file_is_refused(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ApiKeyFileError):
        load_api_keys(path)
