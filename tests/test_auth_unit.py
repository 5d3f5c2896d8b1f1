"""The scope table and the keys file, without a server (tests/test_security.py drives the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog

from imagesearch.api.auth import (
    REQUIRED_SCOPE,
    SCOPES,
    ApiKey,
    ApiKeyFileError,
    ApiKeys,
    MissingScopeError,
    Refusal,
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


def test_scope_table_errors_name_every_rpc_at_fault() -> None:
    incomplete = {name: scope for name, scope in SCOPES.items() if name not in ("GetProduct", "DeleteProduct")}
    with pytest.raises(MissingScopeError) as err:
        _required_scopes(SERVICE, incomplete)
    assert str(err.value) == f"{SERVICE.full_name} rpcs without a scope in auth.SCOPES: DeleteProduct, GetProduct"
    with pytest.raises(MissingScopeError) as err:
        _required_scopes(SERVICE, {**SCOPES, "Zeta": "read", "Renamed": "write"})
    assert str(err.value) == f"auth.SCOPES names rpcs {SERVICE.full_name} does not have: Renamed, Zeta"


def test_scope_table_maps_method_paths_to_scopes() -> None:
    expected = {f"/{SERVICE.full_name}/{name}": scope for name, scope in SCOPES.items()}
    assert _required_scopes(SERVICE, SCOPES) == expected == REQUIRED_SCOPE


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
        ("Xgrpc.health.v1.Health/Check", False, "refused"),
        ("/grpc.health.v1.Health/Check/Extra", False, "refused"),
        ("/grpc.health.v1.Health/", False, "refused"),
        ("/grpc.health.v1.Health", False, "refused"),
        ("", False, "refused"),
    ],
)
def test_required_scope_is_closed_by_default(method: str, protect_all: bool, needed: str) -> None:
    assert required_scope(method, protect_all=protect_all) == needed
    assert ApiKeys([], protect_all=protect_all).needed(method) == needed
    if not protect_all:  # the default
        assert required_scope(method) == needed


def test_keys_file_with_comments_and_both_scopes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# header\n\nread  aaaaaaaaaaaaaaaa\n  write bbbbbbbbbbbbbbbb # indexer # team b\n")
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


def test_keys_file_errors_say_where_and_what(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    with pytest.raises(ApiKeyFileError, match=f"^cannot read API keys file {path}: "):
        load_api_keys(path)
    path.write_bytes(b"read \xe9aaaaaaaaaaaaaaaa\n")  # Latin-1, not UTF-8
    with pytest.raises(ApiKeyFileError, match=f"^cannot read API keys file {path}: "):
        load_api_keys(path)
    path.write_text("# keys\nread aaaaaaaaaaaaaaaa\nwrite short\n")
    with pytest.raises(ApiKeyFileError) as err:
        load_api_keys(path)
    assert str(err.value) == f"{path}:3: expected 'read KEY' or 'write KEY' with a key of at least 16 characters"
    path.write_text("# no keys yet\n")
    with pytest.raises(ApiKeyFileError) as err:
        load_api_keys(path)
    assert str(err.value) == f"{path} holds no keys; remove IMAGESEARCH_API_KEYS_FILE to run without auth"


READ = ApiKey("read", b"r" * 16)
WRITE = ApiKey("write", b"w" * 16)
SEARCH = f"/{SERVICE.full_name}/Search"
DELETE = f"/{SERVICE.full_name}/DeleteProduct"
UNKNOWN_KEY = Refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer KEY'")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {'r' * 16}", "r" * 16, f"Bearer {'r' * 15}", f"Bearer {'r' * 17}"],
)
def test_a_missing_or_unknown_key_is_unauthenticated(header: str | None) -> None:
    keys = ApiKeys([READ, WRITE], protect_all=False)
    assert keys.refusal("read", header, SEARCH) == UNKNOWN_KEY
    assert keys.refusal("refused", header, "/other.Service/Call") == UNKNOWN_KEY
    assert keys.refusal("open", header, "/grpc.health.v1.Health/Check") is None


@pytest.fixture
def log_context() -> Iterator[None]:
    """A clean structlog context: a key that may proceed is bound to it (on a server, to the call's task)."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.mark.parametrize("header", [f"Bearer {'w' * 16}", f"bearer {'w' * 16}", f"Bearer  {'w' * 16} "])
def test_a_known_key_is_matched_whatever_the_schemes_case_and_the_spaces(header: str, log_context: None) -> None:
    assert ApiKeys([READ, WRITE], protect_all=False).refusal("write", header, DELETE) is None
    # The call's log lines name the key (by its id, never the key).
    assert structlog.contextvars.get_contextvars() == {"key_id": WRITE.key_id}


def test_refusals_of_a_known_key_are_permission_denied_and_logged(log_context: None) -> None:
    keys = ApiKeys([READ, WRITE], protect_all=False)
    with structlog.testing.capture_logs() as logs:
        assert keys.refusal("write", f"Bearer {'r' * 16}", DELETE) == Refusal(
            grpc.StatusCode.PERMISSION_DENIED, f"this API key may only read; {DELETE} needs write"
        )
        assert keys.refusal("refused", f"Bearer {'w' * 16}", "/other.Service/Call") == Refusal(
            grpc.StatusCode.PERMISSION_DENIED, "/other.Service/Call is not open to API keys"
        )
    assert [(e["event"], e["key_id"], e["method"]) for e in logs] == [
        ("permission denied", READ.key_id, DELETE),
        ("permission denied", WRITE.key_id, "/other.Service/Call"),
    ]
    assert keys.refusal("read", f"Bearer {'r' * 16}", SEARCH) is None
    assert keys.refusal("read", f"Bearer {'w' * 16}", SEARCH) is None  # write includes read
