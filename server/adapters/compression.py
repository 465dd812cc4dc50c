"""Content-coding negotiation and compression of response bodies (no HTTP framework here).

`choose_coding(accept_encoding, available)` reads `Accept-Encoding` with its q-values (RFC 9110
12.5.3): the coding with the highest q among those the server has wins, ties going to the
server's order (`br`, then `gzip`, then `identity`); `q=0` refuses a coding, `*` stands for
every coding the header does not name, and `identity` is acceptable unless refused explicitly
(`identity;q=0`) or through `*;q=0` (when the header does not name it, it comes after every
coding the header does name, so `gzip;q=0.5` gets gzip). A header that refuses everything
the server can send gives None (the caller then sends identity anyway, which RFC 9110 allows).

`Compressor` compresses dynamic bodies: Brotli at a cheap quality (5 by default: measured
below) and gzip, above a size threshold. Bodies that come from a cache (the catalog's rendered
products and list pages, cached HTML pages) carry a strong ETag naming exactly their bytes;
`Compressor.encode(..., cache_key=etag)` compresses such a body once per coding and keeps the
result in a small bounded LRU, so a hot cached read never pays for compression again.

Measured with `scripts/bench/compression` (medians; 2 shared cores, Python 3.11, brotli 1.2;
the storefront page is the real templates with 24 demo products, images and placeholders):

    body (identity size)       br q4           br q5           br q11         gzip 6
    storefront list, 45 KiB    383 µs, 2.3 KiB 191 µs, 2.2 KiB 52 ms, 1.9 KiB 148 µs, 3.0 KiB
    REST list of 20, 31 KiB     94 µs, 1.8 KiB 141 µs, 1.7 KiB 28 ms, 1.5 KiB 110 µs, 2.2 KiB
    either, cached (LRU hit)   0.34 µs

So the default is quality 5: quality 4 is cheaper on JSON but twice as slow on the HTML pages
(its hasher does badly on their long repeated runs), and quality 11 costs 150-300 times more
for 12-15% fewer bytes, which is why only the asset build uses it (precompressed files). A
cached body pays its compression once, then 0.34 µs per request.
"""

from __future__ import annotations

import gzip
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import brotli

BR, GZIP, IDENTITY = "br", "gzip", "identity"
SERVER_ORDER = (BR, GZIP, IDENTITY)
_ALIASES = {"x-gzip": GZIP}
_IMPLICIT_IDENTITY_Q = 0.0005


def parse_accept_encoding(header: str) -> dict[str, float]:
    """`Accept-Encoding` as {coding: q}, lower-cased; malformed q-values count as 0 (refused),
    so a garbled header never makes us send a coding the client did not ask for."""
    found: dict[str, float] = {}
    for part in header.split(","):
        coding, *params = (piece.strip() for piece in part.split(";"))
        coding = _ALIASES.get(coding.lower(), coding.lower())
        if not coding:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        found[coding] = max(q, found.get(coding, -1.0))
    return found


def choose_coding(header: str | None, available: Sequence[str] = SERVER_ORDER) -> str | None:
    """The coding to send among `available` (listed in the server's preference order, which
    breaks q-value ties), or None when the client refuses every one of them.

    No header at all means any coding is acceptable (RFC 9110), but we then send identity:
    clients that can decode something say so.
    """
    if header is None:
        return IDENTITY if IDENTITY in available else None
    accepted = parse_accept_encoding(header)
    star = accepted.get("*")
    best: str | None = None
    best_q = 0.0
    for coding in available:
        q = accepted.get(coding)
        if q is None and star is not None:
            q = star
        elif q is None:
            # Unlisted identity is acceptable, but after any coding the client names
            # (q-values have three decimals, so this is below every positive one).
            q = _IMPLICIT_IDENTITY_Q if coding == IDENTITY else 0.0
        if q > best_q:  # strictly greater: earlier (preferred) codings win ties
            best, best_q = coding, q
    return best


@dataclass(slots=True)
class CompressionStats:
    """How much compressing this node did (tests and tuning)."""

    compressions: int = 0  # bodies actually compressed (per coding)
    cache_hits: int = 0  # compressed bodies reused from the LRU
    skipped_small: int = 0  # bodies under the threshold, sent as they are


def compress(body: bytes, coding: str, brotli_quality: int, gzip_level: int) -> bytes:
    """`body` in `coding` (`br` or `gzip`)."""
    if coding == BR:
        return bytes(brotli.compress(body, mode=brotli.MODE_TEXT, quality=brotli_quality))
    if coding == GZIP:
        return gzip.compress(body, compresslevel=gzip_level, mtime=0)
    raise ValueError(f"cannot compress to {coding!r}")


class Compressor:
    """Compresses response bodies above `min_bytes`; bodies named by a cache key (their strong
    ETag) are compressed once per coding and kept in an LRU of `cache_entries` entries."""

    def __init__(
        self,
        *,
        min_bytes: int = 1024,
        brotli_quality: int = 5,
        gzip_level: int = 6,
        cache_entries: int = 2048,
    ) -> None:
        self.min_bytes = min_bytes
        self.brotli_quality = brotli_quality
        self.gzip_level = gzip_level
        self.cache_entries = cache_entries
        self.stats = CompressionStats()
        self._cache: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()

    def encode(self, body: bytes, coding: str, cache_key: str | None = None) -> bytes | None:
        """`body` compressed in `coding`, or None when it should go as it is (identity, or
        smaller than `min_bytes`). With `cache_key`, the result is computed once."""
        if coding == IDENTITY:
            return None
        if len(body) < self.min_bytes:
            self.stats.skipped_small += 1
            return None
        if cache_key is None or self.cache_entries <= 0:
            self.stats.compressions += 1
            return compress(body, coding, self.brotli_quality, self.gzip_level)
        key = (cache_key, len(body), coding)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
            return found
        self.stats.compressions += 1
        encoded = compress(body, coding, self.brotli_quality, self.gzip_level)
        self._cache[key] = encoded
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
        return encoded


# --- ETags across codings ---------------------------------------------------------------------

_SUFFIX = {BR: "-br", GZIP: "-gz"}


def coded_etag(etag: str, coding: str) -> str:
    """The strong ETag of `etag`'s body sent in `coding`: a different representation needs a
    different strong validator (RFC 9110 8.8.3), so `"abc"` becomes `"abc-br"` / `"abc-gz"`."""
    suffix = _SUFFIX.get(coding)
    if suffix is None or not etag.endswith('"'):
        return etag
    return etag[:-1] + suffix + '"'


def base_etag(tag: str) -> str:
    """`tag` without `W/` and without a coding suffix from `coded_etag`."""
    tag = tag.strip().removeprefix("W/")
    for suffix in _SUFFIX.values():
        if tag.endswith(suffix + '"'):
            return tag[: -len(suffix) - 1] + '"'
    return tag


def etag_matches(if_none_match: str, etag: str) -> bool:
    """`If-None-Match` against our (identity) ETag, weak comparison (RFC 9110 13.1.2), with
    the coded forms of the same ETag counting as the same resource state."""
    if if_none_match.strip() == "*":
        return True
    wanted = base_etag(etag)
    return any(base_etag(tag) == wanted for tag in if_none_match.split(",") if tag.strip())
