"""Settings: one frozen, validated object built once at start from IMAGESEARCH_* variables and CLI flags.

This is the only module that reads the environment. Everything else receives a `Settings`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

ENV_PREFIX = "IMAGESEARCH_"

CacheBackendName = Literal["auto", "redis", "memory", "none"]
DeviceName = Literal["auto", "cpu", "cuda"]
TextWeightsName = Literal["auto", "fp16", "fp32"]
RuntimeName = Literal["auto", "torch", "openvino"]
PrecisionName = Literal["auto", "bf16", "f32", "int8"]
# Variables that were removed, and what replaces each: set, they stop start-up with this message instead of
# being silently ignored.
REMOVED_VARIABLES = {
    "QUANTIZE_IMAGE_TOWER": "int8 now runs on OpenVINO: set IMAGESEARCH_PRECISION=int8 (needs the int8 extra)",
    "IMAGE_PRECISION": "renamed IMAGESEARCH_PRECISION (both towers)",
}
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable and what is allowed."""


@dataclass(frozen=True)
class Settings:
    host: str = "[::]"
    port: int = 50051
    data_dir: Path = Path("data")
    # An open_clip spec: "ARCH:PRETRAINED_TAG", "ARCH:/path/weights.pt", "local-dir:/path" or a bundled name.
    model: str = DEFAULT_MODEL
    device: DeviceName = "auto"
    # Never touch the network for weights (sets HF_HUB_OFFLINE): start-up fails at once if they are not local.
    offline: bool = False
    # Threads of one forward pass (torch and OpenVINO). 0 = one per physical core this process may use (its CPU
    # affinity and its container's CPU quota; see cpus.py), or one per CPU where measuring says hyper-threads help.
    torch_threads: int = 0
    # Threads that decode and preprocess images. 0 = automatic: 2 on CPU (the model needs the cores), up to 8 on
    # a GPU (there decoding, not the model, limits image throughput).
    decode_threads: int = 0
    # Micro-batching (batching.py): most requests per forward pass, and how long a forward may wait for images
    # that are still being decoded when the model frees up (a lone request never waits).
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    # What runs the towers. auto = measured per tower at the first start on this CPU (runtime_choice.py: which
    # runtime and precision is fastest differs between CPU families), torch on CUDA. The OpenVINO graphs, and the
    # measured choice, are kept under data_dir/runtime-cache.
    runtime: RuntimeName = "auto"
    # OpenVINO's precision: auto = measured (f32, or bf16/f16 where native and clearly faster); f32 and bf16 force
    # one; int8 (opt-in, the int8 extra) quantises the image tower, the text tower's precision is measured.
    precision: PrecisionName = "auto"
    # CUDA: decode and preprocess JPEGs on the GPU (nvJPEG through torchvision); other formats, and JPEGs it
    # refuses, take the CPU path. Off: every image decodes on the CPU.
    device_jpeg_decode: bool = True
    # CPU: how the text tower's weights are held. auto = fp16 where the CPU has fbgemm's fp16 kernels (x86), else
    # fp32. fp16 halves what a query forward reads, and a query forward is bound by that reading. On CUDA the
    # whole model runs in fp16 and only auto/fp16 are accepted.
    text_weights: TextWeightsName = "auto"
    # A Qdrant server or cluster: its REST address (http://qdrant:6333); the service talks gRPC on qdrant_grpc_port.
    qdrant_url: str | None = None
    qdrant_grpc_port: int = 6334
    qdrant_api_key: str | None = field(default=None, repr=False)
    qdrant_collection: str = "products"
    store_timeout_s: float = 5.0
    # Embedded store: fsync every write before acknowledging it (survives power loss, at a disk flush per write).
    # Off, an acknowledged write survives a crash of this process (the WAL is in the page cache) and is flushed
    # to disk every few seconds and at shutdown, like a Qdrant server's default.
    store_sync_writes: bool = False
    # Embedded store: build the HNSW vector index at start when this many products or more are not in it yet;
    # 0 = never. Off by default: building holds the process before it serves, for a time that grows faster than
    # the catalogue, which a deployment must budget for in its start-up probe. Until indexed, every search scans
    # every vector. The figures are in the README and docs/deployment.md.
    store_index_threshold: int = 0
    redis_url: str | None = field(default=None, repr=False)
    cache: CacheBackendName = "auto"
    cache_embedding_ttl_s: int = 7 * 24 * 3600
    cache_result_ttl_s: int = 600
    cache_memory_max_entries: int = 10_000
    # Extra key prefix, so deployments sharing one Redis (staging/production) never read each other's entries.
    cache_namespace: str = ""
    # Prometheus /metrics endpoint on host:metrics_port; 0 = off.
    metrics_port: int = 0
    # The HTTP/JSON port (api/http.py): every rpc through the Connect protocol (JSON POSTs), gRPC-Web, /healthz,
    # /openapi.json and /docs, with the same handlers, keys and TLS as the gRPC port. Unset = off; 0 = any free
    # port. Off unless set, so that an upgrade opens no new port by itself; the container images set 8080.
    http_port: int | None = None
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_chunk_bytes: int = 1024 * 1024
    max_text_chars: int = 1000
    max_top_k: int = 100
    default_top_k: int = 10
    # Images one product may have (Product.images). Each is encoded and stored as its own vector, so this bounds
    # the work and memory of one index request (each image is also bounded by max_image_bytes).
    max_images_per_product: int = 10
    # Boxes one search may crop from its query image (SearchQuery.regions): one encode and one search each.
    max_query_regions: int = 8
    # Default ranking rules (a RankingSpec in proto3 JSON) for searches that send none; unset = relevance alone.
    ranking_rules_file: Path | None = None
    shutdown_grace_s: float = 10.0
    # Encoding RPCs (Search, IndexProduct, IndexProducts) in flight at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_requests: int = 64
    # TLS: server certificate chain and key (PEM). With a client CA as well, clients must present a
    # certificate signed by it (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # API keys ("read KEY" / "write KEY" per line); unset = no authentication.
    api_keys_file: Path | None = None
    # Also require a key for health and reflection (default: open, for probes and grpcurl).
    auth_protect_all: bool = False
    # Fetch images from caller-given URLs (SearchQuery.image_url, Product.image_url). Off: it makes the server
    # open connections for callers; see urlfetch.py for the SSRF rules.
    fetch_image_urls: bool = False
    # Hosts or address ranges exempt from the public-address rule, comma-separated ("images.internal,10.0.0.0/8").
    fetch_allowed_hosts: str = ""
    fetch_timeout_s: float = 5.0
    fetch_max_redirects: int = 3

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535 or self.port == 0, "port", "must be 0..65535")
        _require(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0 (off) to 65535")
        _require(
            self.metrics_port == 0 or self.metrics_port != self.port, "metrics_port", "must differ from the gRPC port"
        )
        _require(self.http_port is None or 0 <= self.http_port <= 65535, "http_port", "must be 0..65535 (unset: off)")
        _require(
            not self.http_port or self.http_port not in (self.port, self.metrics_port),
            "http_port",
            "must differ from the gRPC and metrics ports",
        )
        _require(1 <= self.max_images_per_product <= 64, "max_images_per_product", "must be 1 to 64")
        _require(1 <= self.max_query_regions <= 32, "max_query_regions", "must be 1 to 32")
        _require(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = automatic)")
        _require(self.decode_threads >= 0, "decode_threads", "must be >= 0 (0 = automatic)")
        _require(1 <= self.batch_max_size <= 1024, "batch_max_size", "must be 1..1024")
        _require(0 <= self.batch_max_wait_ms <= 1000, "batch_max_wait_ms", "must be 0..1000")
        _require(self.store_timeout_s > 0, "store_timeout_s", "must be > 0")
        _require(self.store_index_threshold >= 0, "store_index_threshold", "must be >= 0 (0 = never index)")
        _require(self.max_image_bytes > 0, "max_image_bytes", "must be > 0")
        _require(self.max_image_pixels > 0, "max_image_pixels", "must be > 0")
        _require(self.max_chunk_bytes > 0, "max_chunk_bytes", "must be > 0")
        _require(self.max_text_chars > 0, "max_text_chars", "must be > 0")
        _require(1 <= self.default_top_k <= self.max_top_k, "default_top_k", "must be 1..max_top_k")
        _require(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")
        _require(self.max_concurrent_requests > 0, "max_concurrent_requests", "must be > 0")
        _require(self.fetch_timeout_s > 0, "fetch_timeout_s", "must be > 0")
        _require(self.fetch_max_redirects >= 0, "fetch_max_redirects", "must be >= 0")
        _require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file",
            "and IMAGESEARCH_TLS_KEY_FILE must be set together",
        )
        _require(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file",
            "needs IMAGESEARCH_TLS_CERT_FILE and IMAGESEARCH_TLS_KEY_FILE (mutual TLS is TLS plus client certificates)",
        )
        _require(self.cache_memory_max_entries > 0, "cache_memory_max_entries", "must be > 0")
        _require(self.cache_embedding_ttl_s >= 0, "cache_embedding_ttl_s", "must be >= 0 (0 = no expiry)")
        _require(self.cache_result_ttl_s >= 0, "cache_result_ttl_s", "must be >= 0 (0 = no expiry)")
        _require(
            self.cache != "redis" or bool(self.redis_url),
            "cache",
            "is 'redis' but IMAGESEARCH_REDIS_URL is not set",
        )
        _require(bool(self.model.strip()), "model", "must not be empty")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def runtime_cache_dir(self) -> Path:
        """Where converted runtime graphs are kept between starts."""
        return self.data_dir / "runtime-cache"

    @property
    def cache_backend(self) -> Literal["redis", "memory", "none"]:
        """The cache actually used: 'auto' means Redis when a URL is configured, else the in-process LRU."""
        if self.cache == "auto":
            return "redis" if self.redis_url else "memory"
        return self.cache

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from IMAGESEARCH_<NAME> variables, then `overrides` (CLI flags; None values are ignored)."""
        env = os.environ if environ is None else environ
        for name, instead in REMOVED_VARIABLES.items():
            if env.get(ENV_PREFIX + name):
                raise SettingsError(f"{ENV_PREFIX}{name} is no longer read: {instead}")
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise SettingsError(f"{env_var(name)} {what}")


def _parse(name: str, raw: str, hint: Any) -> Any:
    # Optional[X] -> X: an empty variable was already skipped, so a present value is always an X.
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if get_origin(hint) is not Literal and args and type(None) in get_args(hint) else hint
    try:
        if get_origin(base) is Literal:
            allowed = get_args(base)
            value = raw.strip().lower()
            if value not in allowed:
                raise ValueError(f"must be one of {', '.join(allowed)}")
            return value
        if base is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be true or false")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is Path:
            return Path(raw).expanduser()
        return raw
    except ValueError as exc:
        raise SettingsError(f"{env_var(name)}={raw!r}: {exc}") from None


DEFAULT_TARGET = "localhost:50051"


def client_target(environ: Mapping[str, str] | None = None) -> str:
    """Address the CLI's client commands talk to: IMAGESEARCH_TARGET, else localhost:50051."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "TARGET") or DEFAULT_TARGET


OTEL_PREFIX = "OTEL_"


def otel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """OpenTelemetry's standard variables (OTEL_*) of this process, for tracing.start to decide whether tracing is
    on. They keep their standard names rather than becoming settings: the OpenTelemetry SDK reads them itself."""
    env = os.environ if environ is None else environ
    return {name: value for name, value in env.items() if name.startswith(OTEL_PREFIX) and value}
