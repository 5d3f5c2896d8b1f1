"""The HTTP port's listener: uvicorn on the server's own event loop, its socket and its TLS files."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import uvicorn

from imagesearch.api.http.pages import HttpApp


class HttpServer:
    """uvicorn serving the HTTP application on the running event loop, started and stopped with the gRPC server:
    not uvicorn's own serve(), which would install its own signal handlers over the server's."""

    def __init__(self, app: HttpApp, sock: socket.socket, tls: TlsFiles | None) -> None:
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            app,
            lifespan="off",
            interface="asgi3",
            ws="none",
            # The service's own log line per call (RequestLog) replaces the access log; uvicorn's start and stop
            # lines would repeat the server's.
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            ssl_ca_certs=tls.client_ca_file if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(config)
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._sock])
        # uvicorn's loop that refreshes the Date header each second and returns once should_exit is set.
        self._ticks = asyncio.create_task(self._server.main_loop())

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight finish within `grace_s`, then cancel the rest."""
        if grace_s <= 0:
            self.force_exit()
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        # None once forced: nothing is left to wait for (uvicorn would report a timeout of 0 as exceeded).
        self._server.config.timeout_graceful_shutdown = grace_s if grace_s > 0 else None  # type: ignore[assignment]
        await self._server.shutdown(sockets=[self._sock])

    def force_exit(self) -> None:
        """Cut a stop() in progress short: cancel the requests still in flight."""
        self._server.force_exit = True
        for task in self._server.server_state.tasks:
            task.cancel()


class TlsFiles:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.client_ca_file = str(client_ca_file) if client_ca_file else None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port. "[::]" (the default host) is one dual-stack socket on every address, as
    for the gRPC port; asyncio would bind IPv6 only for "::"."""
    host = host.strip("[]")
    if host in ("::", ""):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address: tuple[Any, ...] = ("::", port)
        except OSError:  # no IPv6 here
            sock, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
