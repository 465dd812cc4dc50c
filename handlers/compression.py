"""Dynamic response compression (Brotli or gzip by `Accept-Encoding`), in one place.

`compression_transform(compressor)` makes a Tornado `OutputTransform` that `make_app` installs
for every handler. Why not Tornado's `compress_response`: it speaks gzip only, ignores q-values
(`gzip;q=0` still gets gzip), and compresses every response again on every request; a hot
cached read here costs ~100 µs in total, and compressing its body each time would double that.

What it does, for responses whose whole body is written at once (every handler here calls
`finish(body)`; a streamed body passes through untouched):

- only text the clients read: HTML, JSON (`application/json`, `application/problem+json`,
  `application/graphql-response+json`, `application/manifest+json`), JavaScript, CSS, SVG;
  nothing that already has a `Content-Encoding` (the precompressed static files);
- `Vary: Accept-Encoding` on every such response, compressed or not (a shared cache must not
  hand a Brotli body to a client that asked for identity, nor the reverse);
- at least `FM_COMPRESS_MIN_BYTES` of body, else it goes as it is;
- a response with a strong `ETag` and without `no-store` is a body a cache produced (the
  catalog's rendered products and lists, the storefront's pages): its compressed form is
  computed once per coding and reused (`server.adapters.compression.Compressor`); anything else is
  compressed per request;
- the ETag of a compressed answer becomes `"<etag>-br"` / `"<etag>-gz"` (a strong validator
  must change with the representation), and `If-None-Match` with either form matches
  (`server.adapters.compression.etag_matches`); a 304 answers with the form the client sent.
"""

from __future__ import annotations

import tornado.httputil
import tornado.web

from server.adapters.compression import (
    IDENTITY,
    SERVER_ORDER,
    Compressor,
    base_etag,
    choose_coding,
    coded_etag,
)

COMPRESSIBLE_TYPES = frozenset(
    {
        "text/html",
        "text/plain",
        "text/css",
        "text/javascript",
        "application/javascript",
        "application/json",
        "application/problem+json",
        "application/graphql-response+json",
        "application/manifest+json",
        "image/svg+xml",
    }
)


def compressible(content_type: str) -> bool:
    """Whether a response of this `Content-Type` is text worth compressing."""
    return content_type.split(";")[0].strip().lower() in COMPRESSIBLE_TYPES


def add_vary(headers: tornado.httputil.HTTPHeaders, name: str) -> None:
    """Add `name` to `Vary` unless it is there already."""
    current = headers.get("Vary", "")
    if name.lower() not in (part.strip().lower() for part in current.split(",")):
        headers["Vary"] = f"{current}, {name}" if current else name


def compression_transform(compressor: Compressor) -> type[tornado.web.OutputTransform]:
    """The transform class for `Application.add_transform`, bound to the node's compressor."""

    class CompressionTransform(tornado.web.OutputTransform):
        """Compresses one response (see the module docstring)."""

        def __init__(self, request: tornado.httputil.HTTPServerRequest) -> None:
            self._request = request

        def transform_first_chunk(
            self,
            status_code: int,
            headers: tornado.httputil.HTTPHeaders,
            chunk: bytes,
            finishing: bool,
        ) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
            if status_code == 304:
                self._echo_coded_etag(headers)
                return status_code, headers, chunk
            if "Content-Encoding" in headers or not compressible(headers.get("Content-Type", "")):
                return status_code, headers, chunk
            add_vary(headers, "Accept-Encoding")
            if not finishing or not chunk or status_code in (204, 206):
                return status_code, headers, chunk
            coding = choose_coding(self._request.headers.get("Accept-Encoding"), SERVER_ORDER)
            if coding is None or coding == IDENTITY:
                return status_code, headers, chunk
            etag = headers.get("Etag")
            reusable = bool(etag) and "no-store" not in headers.get("Cache-Control", "")
            encoded = compressor.encode(chunk, coding, etag if reusable else None)
            if encoded is None:
                return status_code, headers, chunk
            headers["Content-Encoding"] = coding
            headers["Content-Length"] = str(len(encoded))
            if etag:
                headers["Etag"] = coded_etag(etag, coding)
            return status_code, headers, encoded

        def transform_chunk(self, chunk: bytes, finishing: bool) -> bytes:
            return chunk

        def _echo_coded_etag(self, headers: tornado.httputil.HTTPHeaders) -> None:
            etag = headers.get("Etag")
            if not etag:
                return
            for tag in self._request.headers.get("If-None-Match", "").split(","):
                tag = tag.strip().removeprefix("W/")
                if tag != etag and base_etag(tag) == base_etag(etag):
                    headers["Etag"] = tag
                    return

    return CompressionTransform
