"""API keys with read and write scopes, checked by a server interceptor.

Keys come from a file (IMAGESEARCH_API_KEYS_FILE), one per line: `read KEY` or `write KEY` (write includes read),
`#` starts a comment. Callers send `authorization: Bearer KEY`. Keys are compared in constant time against every
configured key and never logged; logs name a key by a short hash instead. `ApiKeys` decides; the gRPC port asks it
through `ApiKeyInterceptor`, the HTTP/JSON port (api/http/edge.py) with the same header, so both refuse alike.

Fails closed: each ImageSearchService rpc needs the scope declared in `SCOPES`, health and reflection are open
by name (`OPEN_SERVICES`), and every other method path is refused, served or not.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor

from imagesearch.api.interceptors import Continuation, MethodHandler
from imagesearch.v1 import image_search_service_pb2

log = structlog.get_logger(__name__)

Scope = Literal["read", "write"]

# The scope each ImageSearchService rpc needs. Every rpc of the service descriptor must have one: the server
# refuses to start otherwise (see `_required_scopes`), so a new rpc cannot ship without deciding who may call it.
SCOPES: dict[str, Scope] = {
    "Search": "read",
    "SearchInline": "read",
    "GetProduct": "read",
    "ListProducts": "read",
    "GetServiceInfo": "read",
    "FindDuplicates": "read",
    "IndexProduct": "write",
    "IndexProductInline": "write",
    "IndexProducts": "write",
    "DeleteProduct": "write",
}
# Open to callers without a key (load balancer probes, grpcurl), unless `protect_all`, which makes them need
# `read`. Reflection v1 is listed though only v1alpha is registered: clients such as grpcurl try v1 first and fall
# back to v1alpha only when v1 answers UNIMPLEMENTED, which it must do rather than UNAUTHENTICATED.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class MissingScopeError(RuntimeError):
    pass


def _required_scopes(service: ServiceDescriptor, scopes: Mapping[str, Scope]) -> dict[str, Scope]:
    """Method path -> scope for every rpc of `service`; raises if one has no scope or a scope names no rpc."""
    methods = {method.name for method in service.methods}
    if missing := sorted(methods - scopes.keys()):
        raise MissingScopeError(f"{service.full_name} rpcs without a scope in auth.SCOPES: {', '.join(missing)}")
    if stale := sorted(scopes.keys() - methods):
        raise MissingScopeError(f"auth.SCOPES names rpcs {service.full_name} does not have: {', '.join(stale)}")
    return {f"/{service.full_name}/{name}": scopes[name] for name in sorted(methods)}


# At import, so a server whose contract has an rpc without a scope fails before it binds a port.
REQUIRED_SCOPE = _required_scopes(image_search_service_pb2.DESCRIPTOR.services_by_name["ImageSearchService"], SCOPES)


Need = Scope | Literal["open", "refused"]


def required_scope(method: str, *, protect_all: bool = False) -> Need:
    """What a call to `method` (a '/package.Service/Method' path) needs: a scope, nothing, or it is refused to
    every key (methods nobody declared: other services, unknown names, paths of another shape)."""
    if method in REQUIRED_SCOPE:
        return REQUIRED_SCOPE[method]
    service, _, name = method.removeprefix("/").partition("/")
    if method.startswith("/") and service in OPEN_SERVICES and name and "/" not in name:
        return "read" if protect_all else "open"
    return "refused"


class ApiKeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    scope: Scope
    secret: bytes

    @property
    def key_id(self) -> str:
        """A name for logs: never the key itself."""
        return hashlib.sha256(self.secret).hexdigest()[:8]


def load_api_keys(path: Path) -> list[ApiKey]:
    keys: list[ApiKey] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"cannot read API keys file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or parts[0] not in ("read", "write") or len(parts[1]) < 16:
            raise ApiKeyFileError(
                f"{path}:{number}: expected 'read KEY' or 'write KEY' with a key of at least 16 characters"
            )
        keys.append(ApiKey(scope=parts[0], secret=parts[1].encode()))  # type: ignore[arg-type]
    if not keys:
        raise ApiKeyFileError(f"{path} holds no keys; remove IMAGESEARCH_API_KEYS_FILE to run without auth")
    return keys


@dataclass(frozen=True)
class Refusal:
    """Why a call may not proceed, as the gRPC status the caller gets (the HTTP port maps the code to its own)."""

    code: grpc.StatusCode
    message: str


class ApiKeys:
    """The configured keys, and the one decision both ports make with them: may this caller call this method?"""

    def __init__(self, keys: list[ApiKey], *, protect_all: bool) -> None:
        self._keys = keys
        self.protect_all = protect_all

    def needed(self, method: str) -> Need:
        return required_scope(method, protect_all=self.protect_all)

    def refusal(self, needed: Need, authorization: str | None, method: str) -> Refusal | None:
        """None when a caller sending `authorization` (the header's value, if any) may call `method`, which
        needs `needed`; then the key's id is bound to the call's log lines. Otherwise why not."""
        if needed == "open":
            return None
        key = self._match(authorization)
        if key is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer KEY'"
            )
        if needed == "refused":
            # Not declared anywhere: no key may call it, whether or not something serves it.
            log.info("permission denied", key_id=key.key_id, method=method)
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to API keys")
        if needed == "write" and key.scope != "write":
            log.info("permission denied", key_id=key.key_id, method=method)
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"this API key may only read; {method} needs write")
        structlog.contextvars.bind_contextvars(key_id=key.key_id)
        return None

    def _match(self, header: str | None) -> ApiKey | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode()
        found = None
        for key in self._keys:  # no early exit: the time taken does not reveal which key (or prefix) matched
            if hmac.compare_digest(presented, key.secret):
                found = key
        return found


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The gRPC port's door: every call is decided by `ApiKeys` before its handler (or its request) is touched."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> MethodHandler | None:
        method: str = handler_call_details.method
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        authorization = header if isinstance(header, str) else None  # bytes only for "-bin" keys
        refusal = self._keys.refusal(self._keys.needed(method), authorization, method)
        if refusal is not None:
            return _denied(refusal)
        # None (UNIMPLEMENTED) when nothing serves it, e.g. reflection v1 under protect_all: clients fall back to
        # v1alpha.
        return await continuation(handler_call_details)


def _denied(refusal: Refusal) -> MethodHandler:
    """A handler that refuses the call. A raw stream, whatever the method's kind: any call fits one (the request
    is never read), and callers without a key learn nothing about which methods exist."""

    async def abort(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(refusal.code, refusal.message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers must be

    return grpc.stream_stream_rpc_method_handler(abort)
