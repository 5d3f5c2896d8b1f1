"""The HTTP port's plain GET pages beside the rpcs: /healthz for probes, /openapi.json (generated from the protos
by tools/gen_openapi.py) and /docs (Swagger UI from the swagger-ui-bundle package). Everything else goes to the
Connect application."""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from grpc_health.v1 import health, health_pb2

from imagesearch.api.http.edge import KeyCheck

# The generated OpenAPI document, packaged beside the generated code (tools/gen_proto.sh).
OPENAPI_RESOURCE = "image_search_service.openapi.json"
# Swagger UI's files that the /docs page loads; nothing else of the package is served.
_DOCS_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "index.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
# A refused key on a page, answered with the HTTP status Connect gives the code.
_CONNECT_HTTP_STATUS = {Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403}

Asgi = Callable[[Any, Any, Any], Awaitable[None]]
Page = Callable[[], Awaitable[tuple[int, str, bytes]]]


class HttpApp:
    """Routes GET /healthz, /openapi.json and /docs; everything else goes to the Connect application."""

    def __init__(self, connect: Asgi, health_servicer: health.aio.HealthServicer, api_keys: KeyCheck | None) -> None:
        self._connect = connect
        self._health = health_servicer
        self._api_keys = api_keys

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            page = self._page(path)
            if page is not None:
                headers: tuple[tuple[bytes, bytes], ...] = ()
                try:
                    if self._api_keys is not None:
                        self._api_keys.check_document(_header(scope, b"authorization"), path)
                    status, content_type, body = await page()
                except ConnectError as exc:  # a refused key, in Connect's error shape
                    status, content_type = _CONNECT_HTTP_STATUS[exc.code], "application/json"
                    body = json.dumps({"code": exc.code.value, "message": exc.message}).encode()
                except _Redirect as redirect:
                    status, content_type, body = 308, "text/plain", b""
                    headers = ((b"location", redirect.location.encode()),)
                await _respond(send, status, content_type, b"" if scope["method"] == "HEAD" else body, headers)
                return
        await self._connect(scope, receive, send)

    def _page(self, path: str) -> Page | None:
        if path == "/healthz":
            return self._healthz
        if path == "/openapi.json":
            return _openapi
        if path == "/docs":
            return _docs_redirect
        if path.startswith("/docs/"):
            name = path.removeprefix("/docs/") or "index.html"
            if name == "index.html":
                return _docs_page
            if name in _DOCS_ASSETS:
                return functools.partial(_docs_asset, name)
        return None

    async def _healthz(self) -> tuple[int, str, bytes]:
        """The whole server's grpc.health.v1 status, for HTTP probes: 200 while SERVING, 503 otherwise (store
        unreachable, or draining)."""
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=""), None)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        status = 200 if response.status == health_pb2.HealthCheckResponse.SERVING else 503
        return status, "application/json", json.dumps({"status": name}).encode()


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _respond(
    send: Any, status: int, content_type: str, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _openapi() -> tuple[int, str, bytes]:
    return 200, "application/json", _openapi_document()


@functools.cache
def _openapi_document() -> bytes:
    return (importlib.resources.files("imagesearch.v1") / OPENAPI_RESOURCE).read_bytes()


async def _docs_redirect() -> tuple[int, str, bytes]:
    # The page's assets are relative to /docs/.
    raise _Redirect("/docs/")


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


async def _docs_page() -> tuple[int, str, bytes]:
    return 200, "text/html; charset=utf-8", _docs_html()


async def _docs_asset(name: str) -> tuple[int, str, bytes]:
    return 200, _DOCS_ASSETS[name], _docs_file(name)


@functools.cache
def _docs_html() -> bytes:
    import jinja2

    template = (_swagger_ui_path() / "index.j2").read_text()
    # Relative, so the page still finds the document behind a proxy that serves this port under a prefix.
    return jinja2.Template(template).render(openapi_spec_url="../openapi.json").encode()


@functools.cache
def _docs_file(name: str) -> bytes:
    return (_swagger_ui_path() / name).read_bytes()


def _swagger_ui_path() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))
