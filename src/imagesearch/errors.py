"""Domain exceptions. `api/status.py` maps each to one gRPC status code; nothing else knows about gRPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ImageSearchError(Exception):
    """Base class: every error the service can explain to a caller."""


class InvalidArgument(ImageSearchError):
    """The request is malformed; `violations` names each bad field (sent as google.rpc.BadRequest)."""

    def __init__(self, violations: list[FieldViolation] | FieldViolation, message: str | None = None) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        super().__init__(message or "; ".join(f"{v.field}: {v.description}" for v in self.violations))


class ImageTooLarge(InvalidArgument):
    """The image stream passed the configured byte or pixel limit."""


class NotFound(ImageSearchError):
    """The named product does not exist."""


class UnknownProducts(NotFound):
    """Products named by id (to get, delete, or use as search examples) do not exist."""

    def __init__(self, product_ids: list[str]) -> None:
        self.product_ids = product_ids
        names = ", ".join(repr(pid) for pid in product_ids)
        super().__init__(f"no product with id {names}" if len(product_ids) == 1 else f"no products with ids {names}")


class StoreUnavailable(ImageSearchError):
    """The vector store cannot be reached or failed; the caller may retry later."""


class Overloaded(ImageSearchError):
    """Too many expensive requests are in flight; the caller should retry after a short delay."""


class DeadlineExceeded(ImageSearchError):
    """The caller's deadline passed before the work finished; the work was abandoned."""


class StoreConfigError(ImageSearchError):
    """The store exists but is incompatible with this server (e.g. another embedding dimension). Fatal at start."""


class ModelLoadError(ImageSearchError):
    """The configured model cannot be loaded (e.g. weights unavailable offline). Fatal at start."""
