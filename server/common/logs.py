"""Structured logging: one JSON object per line (or readable console lines), with context.

structlog renders both our own events and the standard library's records (Tornado's access
and application logs, aiopg, redis), so every line of a node's output has the same shape.
Per-request context (the request id) travels in contextvars, bound by the handlers.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(level: str = "info", fmt: str = "json", node_id: str | None = None) -> None:
    """Route structlog and the standard library through one renderer on stderr.

    Safe to call more than once (tests, `dev` after settings are known): the last call wins.
    """
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    processors = list(_SHARED_PROCESSORS)
    if node_id:
        processors.insert(0, _add_node(node_id))
    structlog.configure(
        processors=[*processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=processors,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _add_node(node_id: str) -> Any:
    def add_node(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("node", node_id)
        return event

    return add_node


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger named for its module."""
    return structlog.stdlib.get_logger(name)
