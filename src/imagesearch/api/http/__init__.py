"""The HTTP/JSON port: every ImageSearchService rpc and the health check over the Connect protocol (unary rpcs as
plain HTTP/1.1 POSTs of JSON, so curl and browsers work; streams and gRPC-Web for Connect clients), served by the
connectrpc library on uvicorn, in this process and on this event loop, beside the gRPC server.

Nothing here re-implements the service. The Connect endpoints are built from the service descriptor, as
`service.add_to_server` registers the gRPC ones, and call the same `ImageSearchService` methods and the same
health servicer (endpoints.py). Only the transport's edge differs, and it follows the gRPC port's rules:
- errors: the gRPC port's error mapping (`status.errors_mapped`), written as a Connect error (codec.py);
- API keys: the `Authorization: Bearer KEY` header, the same keys and scopes (`auth.ApiKeys`), checked
  before the request body is read (edge.py);
- the call edge of the gRPC port (api/call_edge.py): one log line and the metrics per call, with the caller's
  x-request-id (or a fresh one) echoed back, and a server span (edge.py);
- deadlines: the caller's `connect-timeout-ms` header, enforced by connectrpc (the handler is cancelled);
- TLS: the same certificate, key and client CA settings (listener.py).
Besides the rpcs: GET /healthz for probes, /openapi.json and /docs (pages.py). app.py puts these together.
"""

from imagesearch.api.http.app import build_app
from imagesearch.api.http.codec import JsonCodec, connect_error
from imagesearch.api.http.listener import HttpServer, TlsFiles, bind

__all__ = ["HttpServer", "JsonCodec", "TlsFiles", "bind", "build_app", "connect_error"]
