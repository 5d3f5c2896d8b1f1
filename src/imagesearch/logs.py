"""structlog set-up: JSON lines (default, for log shippers) or coloured console output (for people)."""

from __future__ import annotations

import logging
import sys

import structlog

from imagesearch.config import LogFormat, LogLevel


def configure_logging(log_format: LogFormat = "json", level: LogLevel = "info") -> None:
    numeric_level = getattr(logging, level.upper())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            # request_id and method, bound per RPC by the logging interceptor
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
