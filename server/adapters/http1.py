"""HTTP/1.1 server connections parsed by httptools, driving Tornado's `Application`.

Why this exists (docs/decisions.md, "HTTP/1.1 on httptools"): on a cached product read,
Tornado's own HTTP/1.1 layer (an `IOStream` per connection, a coroutine per request reading
headers with a regular expression and a timeout, header parsing in Python, a `Future` per
write) cost more than half of the node's CPU. Here the llhttp parser (httptools, the
parser uvicorn uses) reads requests inside an `asyncio.Protocol` on uvloop's transport, and
the connection implements `tornado.httputil.HTTPConnection`: Tornado's routing, request
handlers, cookies, ETags and everything above them run unchanged.

What a connection does, as Tornado's `HTTP1ServerConnection` does: keep-alive and pipelining
(requests answered in order, one at a time), `Expect: 100-continue`, chunked request and
response bodies, HEAD and 304 without bodies, `X-Forwarded-*` behind a trusted proxy,
streamed request bodies with back-pressure (`@stream_request_body`), per-request body limits
(`set_max_body_size`), close callbacks, and `detach()` for WebSocket upgrades. What it adds:
a 413 problem (not a bare 400) when a declared body passes the limit, a 431 for oversized
headers, a 408 when headers trickle in slower than `http_header_timeout_s` or a body stalls for
`http_body_timeout_s` (slowloris), idle
keep-alive connections closed after `http_idle_timeout_s`, and `Connection: close` on every
answer once the node drains.

`FM_HTTP_SERVER=tornado` switches back to Tornado's own `HTTPServer` (`make_http_server`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, cast

import httptools
from tornado import httputil, iostream, netutil
from tornado.httpserver import HTTPServer as TornadoHTTPServer

from server.adapters.refusal_hold import RefusedAddresses
from server.common.logs import get_logger
from server.common.problems import (
    PROBLEM_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    adopt_request_id,
    new_request_id,
    problem,
    status_title,
)

_log = get_logger("finalmarket.http1")
_SWEEP_PERIOD_S = 1.0
_MAX_QUEUED_EVENTS = 64  # parsed events waiting for a slow handler before reading pauses
_CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"
_EMPTY_BODY_CODES = frozenset({204, 304})
HOLD_JITTER = 0.5  # a refusal hold lasts its time plus up to this share of it, at random


class HttpServerLike(Protocol):
    """What the node needs of an HTTP server (ours and Tornado's both fit)."""

    async def listen_on(self, sockets: list[socket.socket]) -> None: ...

    def stop(self) -> None: ...

    async def close_all_connections(self) -> None: ...


class RequestContext:
    """Who is asking: the peer address and scheme, rewritten from `X-Forwarded-*` headers
    for one request when the server trusts a proxy (Tornado's `_HTTPRequestContext` rules)."""

    __slots__ = ("_orig_protocol", "_orig_remote_ip", "_trusted", "protocol", "remote_ip")

    def __init__(self, remote_ip: str, trusted_downstream: frozenset[str]) -> None:
        self.remote_ip = self._orig_remote_ip = remote_ip
        self.protocol = self._orig_protocol = "http"
        self._trusted = trusted_downstream

    def __str__(self) -> str:
        return self.remote_ip

    def apply_forwarded(self, headers: httputil.HTTPHeaders) -> None:
        """Take the client address and scheme from a proxy's headers (the last untrusted
        `X-Forwarded-For` hop, `X-Real-Ip`, `X-Scheme` / `X-Forwarded-Proto`)."""
        ip = headers.get("X-Forwarded-For", self.remote_ip)
        for candidate in reversed(ip.split(",")):
            ip = candidate.strip()
            if ip not in self._trusted:
                break
        ip = headers.get("X-Real-Ip", ip)
        if netutil.is_valid_ip(ip):
            self.remote_ip = ip
        scheme = headers.get("X-Scheme", headers.get("X-Forwarded-Proto", self.protocol))
        scheme = scheme.split(",")[-1].strip() if scheme else scheme
        if scheme in ("http", "https"):
            self.protocol = scheme

    @property
    def peer_ip(self) -> str:
        """The socket's own peer address, whatever a proxy's headers said."""
        return self._orig_remote_ip

    def reset(self) -> None:
        """Back to the socket's own address after a request."""
        self.remote_ip = self._orig_remote_ip
        self.protocol = self._orig_protocol


class DetachedSocket:
    """What `detach()` hands a WebSocket upgrade: the connection's socket, and `close()`
    for the handle the HTTP side still had (the IOStream subset the upgrade uses)."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        self.socket: socket.socket | None = sock

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _problem(status: int, kind: str, detail: str, request_id: str) -> bytes:
    """A complete `Connection: close` response carrying RFC 9457 problem details (the fields
    every problem has, `server.common.problems`), for the refusals the connection makes
    before any handler exists or answers."""
    body = json.dumps(problem(status, kind, detail, request_id)).encode()
    head = (
        f"HTTP/1.1 {status} {status_title(status)}\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n{REQUEST_ID_HEADER}: {request_id}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin1") + body


class Http1Connection(asyncio.Protocol, httputil.HTTPConnection):
    """One client connection: parses requests with llhttp and serves them through the
    Tornado delegate, one at a time, in order (`tornado.httputil.HTTPConnection`)."""

    def __init__(self, server: HttptoolsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.context = RequestContext("0.0.0.0", server.trusted_downstream)
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[tuple[Any, ...]] = deque()
        self._blocked = False  # a delegate asked us to wait (streamed body back-pressure)
        self._reading_paused = False
        self._upgrade = False
        self._hold_s = 0.0  # after the answer being written, read nothing for this long
        self._held: asyncio.TimerHandle | None = None  # a refused client's pause, running
        self.last_active = 0.0
        self.header_started: float | None = None  # when the unfinished head began arriving
        # parse state of the message being read
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # state of the request being served
        self._delegate: httputil.HTTPMessageDelegate | None = None
        self._request_start_line: httputil.RequestStartLine | None = None
        self._request_headers: httputil.HTTPHeaders | None = None
        self._read_finished = True
        self._write_finished = True
        self._headers_sent = False
        self._discard_body = False
        self._close_after = False
        self._chunking = False
        self._expected_remaining: int | None = None
        self._max_body_size = server.max_body_size
        self._body_received = 0
        self._close_callback: Callable[[], None] | None = None
        # output flow control
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._done: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self._done = loop.create_future()
        self._done.set_result(None)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.context = RequestContext(str(peer[0]), self.server.trusted_downstream)
        self.server.connections.add(self)
        refusals = self.server.refusals
        wait_s = refusals.wait_s(self.peer_ip, self.last_active)
        if wait_s > 0:  # its address was refused 429 just now: this one waits too
            if refusals.may_hold(self.peer_ip):
                self._hold_for(wait_s)
            else:
                refusals.turned_away += 1
                self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.now()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The handler decides: it detaches the socket, or refuses and we close.
            self._upgrade = True
            self._pause_reading()
        except httptools.HttpParserError as error:
            if self._header_bytes > self.server.max_header_bytes:
                limit = self.server.max_header_bytes
                refusal = (
                    431,
                    "headers-too-large",
                    f"the request line and headers pass {limit} bytes",
                )
            else:
                refusal = (400, "malformed-request", f"not HTTP/1.1: {error}")
            self._events.append(("error", *refusal))
        if self._events:
            self._pump()
            if len(self._events) > _MAX_QUEUED_EVENTS:
                self._pause_reading()

    def eof_received(self) -> bool | None:
        # A FIN ends the connection, as with Tornado's server: it is how a departed client
        # looks, and handlers are told (`on_connection_close`) so they can stop working for it.
        # (A client that only half-closes after its request loses the answer; HTTP/1.1
        # clients do not do that.)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connection_closed(self)
        if self._held is not None:
            self._held.cancel()
            self._held = None
            self.server.refusals.release(self.peer_ip)
        self._events.clear()
        delegate, self._delegate = self._delegate, None
        callback, self._close_callback = self._close_callback, None
        if delegate is not None:
            if not self._read_finished:
                self._guard(delegate.on_connection_close)
            elif callback is not None:
                self._guard(callback)
        self._release_writers()
        self.transport = None
        del self._parser  # it holds us: without the cycle, refcounting frees both now

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_writers()

    # --- llhttp callbacks (inside feed_data) --------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self.header_started = self.last_active

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._count_header_bytes(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.header_started = None
        parser = self._parser
        self._events.append(
            (
                "head",
                parser.get_method().decode("latin1"),
                self._url.decode("latin1"),
                "HTTP/" + parser.get_http_version(),
                self._headers,
                parser.should_keep_alive(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._events.append(("body", body))

    def on_message_complete(self) -> None:
        self._events.append(("end",))

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.server.max_header_bytes:
            raise _HeadersTooLarge()

    # --- the request pump ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Deliver parsed events to the delegate until one asks us to wait or the next
        request must wait for the current answer."""
        events = self._events
        while events and not self._blocked and self.transport is not None:
            event = events[0]
            kind = event[0]
            if kind == "head":
                if self._delegate is not None or not self._write_finished or self._held:
                    return  # pipelined: served when the current answer is finished
                events.popleft()
                self._start_request(*event[1:])
            elif kind == "body":
                events.popleft()
                self._deliver_body(event[1])
            elif kind == "end":
                events.popleft()
                self._end_request()
            else:  # "error": refuse once nothing is being answered, then close
                if self._delegate is not None:
                    return
                events.clear()
                self._give_up(*event[1:])
                return
        if not events and self._reading_paused and self._may_read:
            self._resume_reading()

    def _start_request(
        self,
        method: str,
        url: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        headers = httputil.HTTPHeaders()
        try:
            for name, value in raw_headers:
                # Whitespace around a value is not part of it (RFC 9110, 5.5); llhttp keeps
                # trailing whitespace, which Tornado's headers refuse.
                headers.add(name.decode("latin1"), value.decode("latin1").strip(" \t"))
        except httputil.HTTPInputError as error:
            # A value that Tornado's headers refuse and llhttp let through (a control
            # character): malformed, said as such instead of closing without an answer.
            self._give_up(400, "malformed-request", f"not HTTP/1.1: {error}")
            return
        start_line = httputil.RequestStartLine(method, url, version)
        self._request_start_line = start_line
        self._request_headers = headers
        self._read_finished = False
        self._write_finished = False
        self._headers_sent = False
        self._discard_body = False
        self._close_after = not keep_alive
        self._chunking = False
        self._expected_remaining = None
        self._max_body_size = self.server.max_body_size
        self._body_received = 0
        if self.server.xheaders:
            self.context.apply_forwarded(headers)
        delegate = self.server.delegate.start_request(self.server, self)
        self._delegate = delegate
        waiting = self._guard(delegate.headers_received, start_line, headers)
        if self.transport is None or self._delegate is None:
            return
        if waiting is not None:
            self._wait_for(waiting, self._after_head)
        else:
            self._after_head()

    def _after_head(self) -> None:
        """The handler has seen the headers (a streaming one has run `prepare`)."""
        if self._write_finished:  # it already answered: skip the body, close afterwards
            self._discard_body = True
            return
        assert self._request_headers is not None
        declared = self._request_headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_size:
            self._too_large(int(declared))
            return
        if self._request_headers.get("Expect", "").lower() == "100-continue":
            self._send(_CONTINUE)

    def _deliver_body(self, chunk: bytes) -> None:
        if self._discard_body or self._delegate is None:
            return
        self._body_received += len(chunk)
        if self._body_received > self._max_body_size:
            self._too_large(self._body_received)
            return
        waiting = self._guard(self._delegate.data_received, chunk)
        if waiting is not None and self.transport is not None:
            self._wait_for(waiting, None)

    def _end_request(self) -> None:
        self._read_finished = True
        if self._discard_body or self._delegate is None:
            return
        if not self._write_finished:
            self._guard(self._delegate.finish)

    def _wait_for(self, waiting: Awaitable[None], then: Callable[[], None] | None) -> None:
        """Stop delivering (and reading) until the delegate's future is done."""
        future = asyncio.ensure_future(waiting)
        if future.done() and not future.cancelled() and future.exception() is None:
            if then is not None:
                then()
            return
        self._blocked = True
        self._pause_reading()

        def resume(done: asyncio.Future[Any]) -> None:
            self._blocked = False
            if done.cancelled() or done.exception() is not None:
                self._abort()  # the handler failed and has said so; nothing more to read
                return
            if then is not None and self.transport is not None:
                then()
            self._pump()

        future.add_done_callback(resume)

    def _too_large(self, size: int) -> None:
        detail = f"request body is {size} bytes; at most {self._max_body_size} are accepted"
        self._give_up(413, "body-too-large", detail)

    def _give_up(self, status: int, kind: str, detail: str) -> None:
        """The request cannot go on (malformed, too large, too slow): tell its handler it is
        gone, answer with a problem unless an answer has begun, log, and close."""
        delegate, self._delegate = self._delegate, None
        # The request's own id when its head was read (else the headers are a previous one's).
        headers = self._request_headers if delegate is not None else None
        request_id = adopt_request_id(headers.get(REQUEST_ID_HEADER) if headers else None)
        if delegate is not None:
            self._guard(delegate.on_connection_close)
        _log.info(
            "http_refused",
            status=status,
            reason=detail,
            peer=str(self.context),
            request_id=request_id,
        )
        if not self._headers_sent:
            self._refuse(_problem(status, kind, detail, request_id))
        else:
            self._abort()

    def _guard(self, call: Callable[..., Any], *args: Any) -> Any:
        """Call into the delegate; an exception there is logged and ends the connection (as
        Tornado does: the handler has already answered or cannot), except Tornado's refusal
        of the request as malformed, which is answered 400."""
        try:
            return call(*args)
        except httputil.HTTPInputError as error:
            # What Tornado refuses and llhttp let through (a Host header Tornado cannot
            # parse, say) is a malformed request, answered 400 as Tornado's server does.
            self._give_up(400, "malformed-request", f"not HTTP/1.1: {error}")
            return None
        except Exception as error:
            _log.error("http_delegate_failed", error=repr(error), exc_info=True)
            self._delegate = None
            self._abort()
            return None

    # --- tornado.httputil.HTTPConnection --------------------------------------------------------

    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Send the status line and headers (and the first chunk of the body)."""
        assert isinstance(start_line, httputil.ResponseStartLine)
        request = self._request_start_line
        assert request is not None and self._request_headers is not None
        self._headers_sent = True
        code = start_line.code
        http11 = request.version == "HTTP/1.1"
        has_body = request.method != "HEAD" and code not in _EMPTY_BODY_CODES and code >= 200
        self._chunking = http11 and has_body and "Content-Length" not in headers
        if self.server.draining:
            self._close_after = True
        if not http11 and has_body and "Content-Length" not in headers:
            self._close_after = True  # the end of the body is the end of the connection
        if http11 and self._close_after:
            headers["Connection"] = "close"
        elif not http11 and not self._close_after:
            headers["Connection"] = "Keep-Alive"
        if self._chunking:
            headers["Transfer-Encoding"] = "chunked"
        if code == 429:
            self._hold_s = self._refusal_hold_s(headers)
        if not has_body:
            self._expected_remaining = 0
        elif "Content-Length" in headers:
            self._expected_remaining = int(headers["Content-Length"])
        else:
            self._expected_remaining = None
        lines = [f"HTTP/1.1 {code} {start_line.reason}"]
        lines.extend(f"{name}: {value}" for name, value in headers.get_all())
        text = "\n".join(lines)
        if "\r" in text or text.count("\n") != len(lines) - 1:
            raise ValueError(f"illegal characters (CR or LF) in a header: {text!r}")
        data = text.replace("\n", "\r\n").encode("latin1") + b"\r\n\r\n"
        if chunk:
            data += self._format_chunk(chunk)
        return self._send(data)

    def _refusal_hold_s(self, headers: httputil.HTTPHeaders) -> float:
        """How long to hold this connection after a 429: the server's refusal hold, at most
        the answer's `Retry-After`; never behind a trusted proxy (`xheaders`), whose
        connections carry other clients' requests too (the edge limits those)."""
        if self.server.xheaders:
            return 0.0
        retry_after = headers.get("Retry-After", "")
        hold_s = self.server.refusal_hold_s
        return min(hold_s, float(retry_after)) if retry_after.isdigit() else hold_s

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        """Send a piece of the body."""
        return self._send(self._format_chunk(chunk))

    def finish(self) -> None:
        """The answer is complete: end the chunked body, then serve the next request."""
        remaining = self._expected_remaining
        if remaining is not None and remaining != 0 and self.transport is not None:
            self._abort()
            raise httputil.HTTPOutputError(
                f"Tried to write {remaining} bytes less than Content-Length"
            )
        if self._chunking:
            self._send(b"0\r\n\r\n")
        self._write_finished = True
        self._headers_sent = False  # nothing is being answered now
        self._close_callback = None
        if self.server.xheaders:
            self.context.reset()
        if not self._read_finished:
            self._close_after = True  # the rest of the request body was never read
        hold_s, self._hold_s = self._hold_s, 0.0
        if hold_s > 0:  # refused 429: its address's new connections wait too
            self.server.refusals.refused(self.peer_ip, hold_s, self.server.now())
        transport = self.transport
        if transport is None:
            return
        if self._close_after or self._upgrade:
            self._delegate = None
            transport.close()  # after what is buffered is sent
            return
        self._delegate = None
        if hold_s > 0:
            self._hold_for(hold_s)
        elif self._events:
            asyncio.get_running_loop().call_soon(self._pump)
        elif self._reading_paused and not self._blocked:
            self._resume_reading()

    @property
    def peer_ip(self) -> str:
        """The socket's own peer address (whatever a proxy's headers say)."""
        return self.context.peer_ip

    def _hold_for(self, seconds: float) -> None:
        """Read and serve nothing more from this connection for `seconds`: it, or another
        of its address, was just refused 429 (`server.adapters.refusal_hold`). A flood then
        costs the node one refusal per connection per hold instead of one per request, and
        its bystanders keep their latency. Up to half as long again, at random: connections
        refused together are not all read again at one instant (a burst of refusals that
        bystanders would queue behind)."""
        self.server.refusals.hold(self.peer_ip)
        self._pause_reading()
        wait_s = seconds * (1.0 + random.random() * HOLD_JITTER)
        self._held = asyncio.get_running_loop().call_later(wait_s, self._release)

    def _release(self) -> None:
        self._held = None
        refusals = self.server.refusals
        refusals.release(self.peer_ip)
        if self.transport is None:
            return
        wait_s = refusals.wait_s(self.peer_ip, self.server.now())
        if wait_s > 0:  # its address was refused again meanwhile
            self._hold_for(wait_s)
        elif self._events:
            self._pump()
        elif self._reading_paused and self._may_read:
            self._resume_reading()

    @property
    def _may_read(self) -> bool:
        """Nothing holds reading back: no handler's back-pressure, upgrade or refusal hold."""
        return not self._blocked and not self._upgrade and self._held is None

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        """Called if the client goes away before the answer is finished."""
        self._close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        """This request may send a body of up to `max_body_size` bytes."""
        self._max_body_size = max_body_size

    def set_body_timeout(self, timeout: float) -> None:
        """Accepted for Tornado compatibility; slow bodies are bounded by the idle timeout."""

    def detach(self) -> DetachedSocket:
        """Hand the socket to another protocol (a WebSocket upgrade): HTTP stops here."""
        transport = self.transport
        assert transport is not None
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        self._delegate = None
        self._close_callback = None
        self._write_finished = self._read_finished = True
        self._events.clear()
        self.server.connection_closed(self)
        transport.abort()  # closes our descriptor only; the duplicate keeps the connection
        return DetachedSocket(sock)

    # --- helpers --------------------------------------------------------------------------------

    def _format_chunk(self, chunk: bytes) -> bytes:
        if self._expected_remaining is not None:
            self._expected_remaining -= len(chunk)
            if self._expected_remaining < 0:
                self._abort()
                raise httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunking and chunk:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def _send(self, data: bytes) -> asyncio.Future[None]:
        transport = self.transport
        if transport is None or transport.is_closing():
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(iostream.StreamClosedError())
            future.exception()  # nobody has to look at it
            return future
        transport.write(data)
        if not self._write_paused:
            assert self._done is not None
            return self._done
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        return waiter

    def _release_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if self.transport is None:
                    waiter.set_exception(iostream.StreamClosedError())
                    waiter.exception()
                else:
                    waiter.set_result(None)

    def _refuse(self, answer: bytes) -> None:
        """Send `answer` for a request no handler will answer, and close."""
        self._delegate = None
        self._write_finished = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
            transport.close()

    def _abort(self) -> None:
        """Close after what is already buffered has been sent."""
        self._events.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def kill(self) -> None:
        """Close now, dropping anything unsent (a client that stopped reading)."""
        self._events.clear()
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def idle(self) -> bool:
        """No request is being read or answered."""
        return self._delegate is None and self._write_finished and not self._events

    def close_if_idle(self) -> None:
        """Close a keep-alive connection between requests."""
        if self.idle and self.header_started is None:
            self._abort()

    def expire(self, now: float) -> None:
        """Apply the header, body and idle timeouts (called by the server's sweep)."""
        server = self.server
        if self._held is not None:
            return  # held back by us after a refusal, not idle by the client's choice
        if self.header_started is not None and now - self.header_started > server.header_timeout_s:
            if self.idle:
                detail = f"the request line and headers took over {server.header_timeout_s:g}s"
                self._give_up(408, "request-timeout", detail)
            return
        quiet_s = now - self.last_active
        if self.idle:
            if quiet_s > server.idle_timeout_s:
                self._abort()
        elif self._reading_body and quiet_s > server.body_timeout_s:
            detail = f"no part of the request body came for {server.body_timeout_s:g}s"
            self._give_up(408, "request-timeout", detail)

    @property
    def _reading_body(self) -> bool:
        """Waiting for more of the request body from the client (not held back by us)."""
        return not self._read_finished and not self._blocked and self._delegate is not None


class _HeadersTooLarge(Exception):
    """Raised inside llhttp's callbacks to stop parsing a head past the limit."""


class HttptoolsServer:
    """Listens and serves HTTP/1.1 with `Http1Connection`s on the running asyncio loop."""

    def __init__(
        self,
        delegate: httputil.HTTPServerConnectionDelegate,
        *,
        xheaders: bool = False,
        trusted_downstream: Iterable[str] = (),
        max_body_size: int = 100 * 1024 * 1024,
        max_header_bytes: int = 64 * 1024,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        idle_timeout_s: float = 75.0,
        refusal_hold_s: float = 0.0,
        backlog: int = 2048,
    ) -> None:
        self.delegate = delegate
        self.backlog = backlog
        self.xheaders = xheaders
        self.trusted_downstream = frozenset(trusted_downstream)
        self.max_body_size = max_body_size
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.refusal_hold_s = refusal_hold_s
        self.refusals = RefusedAddresses()
        self.connections: set[Http1Connection] = set()
        self.draining = False
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_closed: asyncio.Event | None = None

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def listen_on(self, sockets: list[socket.socket]) -> None:
        """Serve on already bound listening sockets."""
        self._loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(
                # create_server listens again: give it the backlog, not asyncio's 100
                await self._loop.create_server(
                    lambda: Http1Connection(self), sock=sock, backlog=self.backlog
                )
            )
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP_PERIOD_S, self._sweep)

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for connection in list(self.connections):
            connection.expire(now)
        self.refusals.sweep(now)
        self._sweeper = self._loop.call_later(_SWEEP_PERIOD_S, self._sweep)

    def stop(self) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones after their
        answer (which says `Connection: close`)."""
        self.draining = True
        for server in self._servers:
            server.close()
        self._servers = []
        for connection in list(self.connections):
            connection.close_if_idle()

    async def close_all_connections(self) -> None:
        """Close every connection at once (unsent answers are dropped: this is the end of
        the drain) and wait until they are gone."""
        self.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.connections:
            self._all_closed = asyncio.Event()
            for connection in list(self.connections):
                connection.kill()
            await self._all_closed.wait()

    def connection_closed(self, connection: Http1Connection) -> None:
        """A connection is gone (closed or detached)."""
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()


# What Tornado's HTTP/1 connection writes, and all it writes, when it cannot read a request
# (`HTTPInputError` in `HTTP1Connection._read_message_inner`: a malformed start line or
# header, a bad chunk, a declared or chunked body past `max_body_size`); it then closes.
_TORNADO_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_TORNADO_400_DETAIL = (
    "the request could not be read as HTTP/1.1 (a malformed request line, header or chunk), "
    "or its body passes FM_MAX_BODY_BYTES; with FM_HTTP_SERVER=tornado the node's log line "
    "`Malformed HTTP message` says which"
)


class _ProblemAnsweringHTTPServer(TornadoHTTPServer):
    """Tornado's `HTTPServer`, whose bare `400 Bad Request` for a request it cannot read is
    sent as a 400 problem (`malformed-request`, the fields every problem has) instead.

    Tornado writes that answer itself, from inside its connection's read loop, with no hook
    to change it; the one place it passes through that we own is the connection's stream, so
    each stream's `write` swaps that exact answer for the problem. Tornado gives no reason
    with it, so unlike ours (`Http1Connection`) it cannot say 413 for a body past the limit;
    and past `max_header_size` Tornado closes without any answer (its stream's read fails
    before anything is parsed), which no hook reaches: both are noted in docs/decisions.md.
    """

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        write = stream.write

        def write_problem_for_bare_400(data: bytes | memoryview) -> asyncio.Future[None]:
            if data == _TORNADO_BARE_400:
                data = _problem(400, "malformed-request", _TORNADO_400_DETAIL, new_request_id())
                _log.info("http_refused", status=400, peer=str(address[0]) if address else "")
            return write(data)

        stream.write = write_problem_for_bare_400  # type: ignore[method-assign]
        super().handle_stream(stream, address)


class TornadoServer:
    """Tornado's own `HTTPServer` behind the same small interface (`FM_HTTP_SERVER=tornado`);
    its bare 400s are problems (`_ProblemAnsweringHTTPServer`)."""

    def __init__(self, delegate: httputil.HTTPServerConnectionDelegate, **options: Any) -> None:
        self.server = _ProblemAnsweringHTTPServer(delegate, **options)

    async def listen_on(self, sockets: list[socket.socket]) -> None:
        self.server.add_sockets(sockets)

    def stop(self) -> None:
        self.server.stop()

    async def close_all_connections(self) -> None:
        await self.server.close_all_connections()


def make_http_server(
    delegate: httputil.HTTPServerConnectionDelegate, settings: Any
) -> HttpServerLike:
    """The HTTP server `settings.http_server` names, configured from the settings."""
    if settings.http_server == "tornado":
        return TornadoServer(
            delegate,
            xheaders=settings.trust_forwarded_headers,
            max_body_size=settings.max_body_bytes,
            idle_connection_timeout=settings.http_idle_timeout_s,
            max_header_size=settings.http_max_header_bytes,
        )
    return HttptoolsServer(
        delegate,
        xheaders=settings.trust_forwarded_headers,
        max_body_size=settings.max_body_bytes,
        max_header_bytes=settings.http_max_header_bytes,
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        idle_timeout_s=settings.http_idle_timeout_s,
        refusal_hold_s=settings.http_refusal_hold_s,
        backlog=settings.listen_backlog,
    )
