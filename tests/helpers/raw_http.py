"""A minimal HTTP/1.1 client over a raw socket that shows the bytes: what the HTTP/1 layer
and the problem answers are tested with, where a real client would hide framing."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class Response:
    """One response as read off the socket (header names lower-cased)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> Response:
    """One response: status, headers (lower-cased names), body by length, chunks or close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin1").split("\r\n")[:-2]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    if head_request or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), 10)
    return Response(status, headers, body)


async def connect(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to `http://host:port`."""
    host, port = base_url.split("//")[1].split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_by_server(reader: asyncio.StreamReader, within_s: float = 5.0) -> bool:
    """True when the server closes the connection (EOF) within the time."""
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except (TimeoutError, ConnectionResetError):
        return False
