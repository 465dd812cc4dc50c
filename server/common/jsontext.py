"""Strict JSON input: what `json.loads` accepts, minus strings that are not valid Unicode.

JSON's `\\uD800`-style escapes can spell lone surrogates, which Python decodes into `str`
objects that cannot be encoded as UTF-8 again. Echoing one (an Action Cable identifier, a
broadcast payload, a GraphQL variable, a product name bound for PostgreSQL) would fail far from
where it came in: a dropped connection, a 500, or a broadcast that breaks for every subscriber.
Every JSON a client sends is therefore read with `loads`, which refuses such input at the door
with a `ValueError` the caller answers as malformed input.
"""

from __future__ import annotations

import json
import re
from typing import Any

# An escape of a UTF-16 surrogate (U+D800..U+DFFF); pairs are fine, lone ones are not.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


class LoneSurrogate(ValueError):
    """The JSON was well-formed but a string in it holds a lone surrogate."""

    def __init__(self) -> None:
        super().__init__("a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF escape)")


def loads(text: str | bytes | bytearray) -> Any:
    """`json.loads`, raising `LoneSurrogate` (a ValueError) for strings Unicode forbids.

    Only input that escapes a surrogate is checked again (a second encode of the value), so
    ordinary JSON costs one regular-expression scan more than `json.loads`.
    """
    value = json.loads(text)
    if isinstance(text, str):
        suspicious = _SURROGATE_ESCAPE.search(text) is not None
    else:
        # Only UTF-8 input can be scanned as bytes; UTF-16/32 JSON is always checked.
        suspicious = (
            json.detect_encoding(text) != "utf-8"
            or _SURROGATE_ESCAPE_BYTES.search(text) is not None
        )
    if suspicious:
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise LoneSurrogate() from None
    return value
