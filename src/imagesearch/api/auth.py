"""API keys with read and write scopes, checked by a server interceptor.

Keys come from a file (IMAGESEARCH_API_KEYS_FILE), one per line: `read KEY` or `write KEY` (write includes read),
`#` starts a comment. Callers send `authorization: Bearer KEY`. Keys are compared in constant time against every
configured key and never logged; logs name a key by a short hash instead.

Fails closed: each ImageSearchService rpc needs the scope declared in `SCOPES`, health and reflection are open
by name (`OPEN_SERVICES`), and every other method path is refused, served or not.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor

from imagesearch.api.interceptors import with_behaviour
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


def required_scope(method: str, *, protect_all: bool = False) -> Scope | Literal["open", "refused"]:
    """What a call to `method` (a '/package.Service/Method' path) needs: a scope, nothing, or it is refused to
    every key (methods nobody declared: other services, unknown names)."""
    if method in REQUIRED_SCOPE:
        return REQUIRED_SCOPE[method]
    service = method[1:].partition("/")[0] if method.startswith("/") else ""
    if service in OPEN_SERVICES:
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
    except OSError as exc:
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


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[ApiKey], *, protect_all: bool = False) -> None:
        self._keys = keys
        self._protect_all = protect_all

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        needed = required_scope(method, protect_all=self._protect_all)
        if needed == "open":
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        key = self._match(str(metadata.get("authorization", "")))
        if key is None:
            return _denied(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer KEY'"
            )
        if needed == "refused":
            # Not declared anywhere: no key may call it, whether or not something serves it.
            log.info("permission denied", key_id=key.key_id, method=method)
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to API keys")
        if needed == "write" and key.scope != "write":
            log.info("permission denied", key_id=key.key_id, method=method)
            return _denied(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"this API key may only read; {method} needs write"
            )
        if handler is None:
            return None  # UNIMPLEMENTED, e.g. reflection v1 under protect_all: clients fall back to v1alpha
        structlog.contextvars.bind_contextvars(key_id=key.key_id)
        return handler

    def _match(self, header: str) -> ApiKey | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = token.strip().encode()
        found = None
        for key in self._keys:  # no early exit: the time taken does not reveal which key (or prefix) matched
            if hmac.compare_digest(presented, key.secret):
                found = key
        return found


def _denied(
    handler: grpc.RpcMethodHandler[Any, Any] | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def abort_streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers must be

    if handler is None:
        # Nothing serves the method: refuse it as a raw stream (any call fits one), so that callers without a
        # key learn nothing about which methods exist.
        return grpc.stream_stream_rpc_method_handler(abort_streaming)
    return with_behaviour(handler, single=abort, streaming=abort_streaming)
