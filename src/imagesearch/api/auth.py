"""API keys with read and write scopes, checked by a server interceptor.

Keys come from a file (IMAGESEARCH_API_KEYS_FILE), one per line: `read KEY` or `write KEY` (write includes read),
`#` starts a comment. Callers send `authorization: Bearer KEY`. Keys are compared in constant time against every
configured key and never logged; logs name a key by a short hash instead.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import structlog

from imagesearch.api.interceptors import with_behaviour

log = structlog.get_logger(__name__)

Scope = Literal["read", "write"]
_SERVICE = "/imagesearch.v1.ImageSearchService/"
# The scope each RPC needs. Anything not listed (health, reflection) is open unless `protect_all` is set.
REQUIRED_SCOPE: dict[str, Scope] = {
    _SERVICE + "Search": "read",
    _SERVICE + "GetProduct": "read",
    _SERVICE + "ListProducts": "read",
    _SERVICE + "GetServiceInfo": "read",
    _SERVICE + "IndexProduct": "write",
    _SERVICE + "IndexProducts": "write",
    _SERVICE + "DeleteProduct": "write",
}


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
        needed = REQUIRED_SCOPE.get(method, "read" if self._protect_all else None)
        if handler is None or needed is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        key = self._match(str(metadata.get("authorization", "")))
        if key is None:
            return _denied(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key: send 'authorization: Bearer KEY'"
            )
        if needed == "write" and key.scope != "write":
            log.info("permission denied", key_id=key.key_id, method=method)
            return _denied(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"this API key may only read; {method} needs write"
            )
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
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def abort_streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers must be

    return with_behaviour(handler, single=abort, streaming=abort_streaming)
