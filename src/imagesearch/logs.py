"""structlog set-up: JSON lines (default, for log shippers) or coloured console output (for people).

Every line the process writes goes through the same renderer: structlog's own loggers, and the standard-library
loggers of grpc, huggingface_hub, open_clip, qdrant, httpx and the rest (through a root handler with structlog's
ProcessorFormatter), and Python warnings. With JSON logs, a traceback from a library is one JSON line with an
`exception` field, never lines of plain text in the stream.
"""

from __future__ import annotations

import logging
import sys

import structlog

from imagesearch.config import LogFormat, LogLevel
from imagesearch.tracing import add_trace_context

# Shared by structlog's loggers and the standard-library records formatted through structlog.
_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    # request_id and method, bound per RPC by the logging interceptor
    structlog.contextvars.merge_contextvars,
    # trace_id and span_id while a span is current (tracing on): the RPC's log line leads to its trace
    add_trace_context,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(log_format: LogFormat = "json", level: LogLevel = "info") -> None:
    numeric_level = getattr(logging, level.upper())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED_PROCESSORS, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    logging.captureWarnings(True)
