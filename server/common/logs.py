"""Structured logging: one JSON object per line (or readable console lines), with context.

Every line of a node's output has the same shape: our own events (structlog), the standard
library's records (Tornado, aiopg, redis) and the access log. None of them is written on the
caller's thread: each is rendered to bytes and put in a bounded `LineBuffer` that a background
thread writes to stderr, so a slow disk or a stalled pipe never blocks the event loop; lines
that do not fit are dropped and counted (`lines_dropped()`, `fm_log_lines_dropped_total`).

Costs, per line on the caller's thread: an access line is one dict and one orjson encode
(`AccessLog`); a structlog event is its short processor chain and the same encode, without the
standard library's `LogRecord` round trip; only foreign records go through `logging`.
Per-request context (the request id) travels in contextvars, bound by the handlers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import orjson
import structlog

from server.common.logbuffer import (
    DEFAULT_CAPACITY_LINES,
    DEFAULT_FLUSH_INTERVAL_S,
    FileDescriptorSink,
    LineBuffer,
    LineSink,
)

# How long a flush, or closing the log at exit, waits for a stalled sink before giving up.
LOG_CLOSE_TIMEOUT_S = 5.0

_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def _dumps(value: Any, default: Any = repr, **_ignored: Any) -> bytes:
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # an int wider than 64 bits, say: the slow way, not lost
        return json.dumps(value, default=default).encode()


def _dumps_text(value: Any, **kw: Any) -> str:
    return _dumps(value, **kw).decode()


class BufferedLineHandler(logging.Handler):
    """The root handler: renders each record (with the formatter `configure_logging` gives
    it) on the caller's thread and puts the line in `buffer`; `flush` and `close` wait for
    the writer at most `LOG_CLOSE_TIMEOUT_S`, so a process whose log nobody reads still exits.

    It also renders the access line (`access_line`) and structlog's events (`put_rendered`)
    without a `LogRecord`, in the same format and the same buffer."""

    def __init__(self, buffer: LineBuffer, fmt: str, node_id: str | None) -> None:
        super().__init__()
        self.buffer = buffer
        self.fmt = fmt
        self.node_id = node_id
        self._second = -1
        self._second_text = b""
        self._access_suffixes: dict[tuple[int, str], bytes] = {}
        self._sink_stalled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging must not raise into the caller
            self.handleError(record)
            return
        self.buffer.put(line.encode("utf-8", "backslashreplace") + b"\n")

    def put_rendered(self, line: str | bytes) -> None:
        """Buffer a line rendered elsewhere (structlog's renderer)."""
        if isinstance(line, str):
            line = line.encode("utf-8", "backslashreplace")
        self.buffer.put(line + b"\n")

    def timestamp(self) -> bytes:
        """Now, as structlog's ISO UTC stamper writes it (the second's text is cached)."""
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second_text = text.encode()
            self._second = second
        return b"%s.%06dZ" % (self._second_text, micros)

    def access_line(self, level: int, logger: str, fields: dict[str, Any]) -> None:
        """Buffer one access line: `fields` (str, int, float or None values), then event,
        node, level, logger and time, in the keys and order structlog's chain gives them.
        Only `fields` is encoded per line; the rest is rendered once per level and logger."""
        try:
            encoded = orjson.dumps(fields)
        except TypeError:  # a value orjson does not know: rendered as structlog would
            encoded = _dumps(fields)
        suffix = self._access_suffixes.get((level, logger))
        if suffix is None:
            suffix = self._access_suffix(level, logger)
        self.buffer.put(b"".join((encoded[:-1], suffix, self.timestamp(), b'"}\n')))

    def _access_suffix(self, level: int, logger: str) -> bytes:
        constant: dict[str, Any] = {"event": "request"}
        if self.node_id:
            constant["node"] = self.node_id
        constant["level"] = _LEVEL_NAMES.get(level, "info")
        constant["logger"] = logger
        # {"event":...,"logger":"..."} -> ,"event":...,"logger":"...","timestamp":"
        suffix = b"," + orjson.dumps(constant)[1:-1] + b',"timestamp":"'
        self._access_suffixes[(level, logger)] = suffix
        return suffix

    def flush(self) -> None:
        if not self._sink_stalled:
            self._sink_stalled = not self.buffer.flush(LOG_CLOSE_TIMEOUT_S)

    def close(self) -> None:
        # logging.shutdown() flushes, then closes: a sink that stalled the one is not waited
        # for again by the other.
        self.buffer.close(0 if self._sink_stalled else LOG_CLOSE_TIMEOUT_S)
        super().close()


class _LineLogger:
    """structlog's final logger: hands the rendered event to the buffered handler."""

    def __init__(self, name: str, handler: BufferedLineHandler) -> None:
        self.name = name  # for add_logger_name
        self._handler = handler

    def msg(self, line: str | bytes) -> None:
        self._handler.put_rendered(line)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LineLoggerFactory:
    def __init__(self, handler: BufferedLineHandler) -> None:
        self._handler = handler

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(str(args[0]) if args else "", self._handler)


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    node_id: str | None = None,
    *,
    stream: LineSink | None = None,
    buffer_lines: int = DEFAULT_CAPACITY_LINES,
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
) -> BufferedLineHandler:
    """Route structlog, the standard library and the access log through one renderer and
    one buffered writer on `stream` (stderr by default); return the handler.

    Safe to call more than once (tests, `dev` after settings are known): the last call wins,
    and the previous handler is flushed and closed first, so no line is reordered or lost.
    """
    renderer: Any
    foreign_renderer: Any
    if fmt == "console":
        renderer = foreign_renderer = structlog.dev.ConsoleRenderer(colors=False)
        exceptions: list[Any] = []  # the console renderer formats them itself
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        foreign_renderer = structlog.processors.JSONRenderer(serializer=_dumps_text)
        exceptions = [structlog.processors.format_exc_info]
    processors = list(_SHARED_PROCESSORS)
    if node_id:
        processors.insert(0, _add_node(node_id))
    handler = BufferedLineHandler(
        LineBuffer(stream or _stderr_bytes(), buffer_lines, flush_interval_s), fmt, node_id
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, BufferedLineHandler):
            root.removeHandler(old)
            old.close()
    structlog.configure(
        processors=[*processors, *exceptions, renderer],
        logger_factory=_LineLoggerFactory(handler),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=processors,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,
                foreign_renderer,
            ],
        )
    )
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler


def _stderr_bytes() -> LineSink:
    try:
        return FileDescriptorSink(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a test's replaced stderr: no descriptor
        return _TextAsBinary(sys.stderr)


class _TextAsBinary:
    """A text stream (a test's replaced stderr) written with bytes."""

    def __init__(self, text: Any) -> None:
        self._text = text

    def write(self, data: bytes) -> int:
        return int(self._text.write(data.decode("utf-8", "backslashreplace")))

    def flush(self) -> None:
        self._text.flush()


def _add_node(node_id: str) -> Any:
    def add_node(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("node", node_id)
        return event

    return add_node


def buffered_handlers() -> list[BufferedLineHandler]:
    """The buffered handlers on the root logger now (one after `configure_logging`)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, BufferedLineHandler)]


def lines_dropped() -> int:
    """Log lines given up since start by the current handler (full buffer, failed writes)."""
    return sum(h.buffer.dropped for h in buffered_handlers())


def lines_buffered() -> int:
    """Log lines waiting for the writer now."""
    return sum(h.buffer.buffered for h in buffered_handlers())


class AccessLog:
    """The access log: one line per finished request, built with one dict and one encode.

    Same keys, order and level as a structlog event named `request` would have; with the
    console format (or before `configure_logging`), it is such an event.
    """

    def __init__(self, name: str = "finalmarket.access") -> None:
        self.name = name
        self._logger = logging.getLogger(name)
        self._structured = get_logger(name)

    def enabled_for(self, level: int) -> bool:
        """Whether a line at `level` would be written (check before building anything)."""
        return self._logger.isEnabledFor(level)

    def write(self, level: int, fields: dict[str, Any]) -> None:
        """Write one line at `level` with `fields` (method, path, status, ...), in order."""
        for handler in self._logger.root.handlers:
            if isinstance(handler, BufferedLineHandler) and handler.fmt == "json":
                handler.access_line(level, self.name, fields)
                return
        self._structured.log(level, "request", **fields)


def get_logger(name: str) -> Any:
    """A structured logger named for its module (structlog's filtering bound logger)."""
    return structlog.get_logger(name)
