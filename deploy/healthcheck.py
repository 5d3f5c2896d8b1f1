#!/usr/bin/env python3
"""Container health check: exit 0 when the server's grpc.health.v1 service answers SERVING and, while
IMAGESEARCH_HTTP_PORT is set, its HTTP/JSON port answers GET /healthz with 200; else 1.

The image's HEALTHCHECK and docker-compose.yml run it, so no probe binary has to be downloaded into the image:
it uses the grpcio and grpcio-health-checking the service already depends on.

Usage: imagesearch-healthcheck [TARGET [SERVICE]]
  TARGET   default localhost:$IMAGESEARCH_PORT (50051)
  SERVICE  default "" (the whole server); e.g. imagesearch.v1.ImageSearchService

The HTTP check goes to localhost:$IMAGESEARCH_HTTP_PORT. Plaintext only: with IMAGESEARCH_TLS_CERT_FILE set,
override the health check (see docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def check(target: str, service: str = "", timeout_s: float = TIMEOUT_S) -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...). Raises grpc.RpcError if the server does not
    answer in time."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def check_http(port: str, timeout_s: float = TIMEOUT_S) -> str:
    """The HTTP/JSON port's GET /healthz status ("SERVING", ...). Raises OSError if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/healthz", timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while NOT_SERVING, with the status in the body
        body = exc.read()
    status: str = json.loads(body).get("status", "UNKNOWN")
    return status


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"localhost:{os.environ.get('IMAGESEARCH_PORT') or 50051}"
    service = argv[2] if len(argv) > 2 else ""
    try:
        status = check(target, service)
    except grpc.RpcError as exc:
        # Before the model has loaded the port is closed: UNAVAILABLE, which the start period absorbs.
        reason = exc.code().name if isinstance(exc, grpc.Call) else type(exc).__name__
        print(f"unhealthy: {target}: {reason}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    http_port = os.environ.get("IMAGESEARCH_HTTP_PORT", "")
    if status == "SERVING" and http_port not in ("", "0"):
        try:
            status = check_http(http_port)
        except (OSError, ValueError) as exc:
            print(f"unhealthy: HTTP port {http_port}: {exc}", file=sys.stderr)
            return 1
        print(f"localhost:{http_port}/healthz: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
