"""Checks on a GraphQL document's text before it reaches the parser, and its normal form.

Why check before parsing: tartiflette parses with libgraphqlparser (C) and then turns the
result into Python nodes recursively. A few thousand nested brackets make the Python side fail
slowly (seconds of CPU for 5,000 levels) and some tens of thousands crash the C parser's stack
(a segfault takes the whole node down). So the text is bounded in size and in bracket nesting
first, with a scan that skips strings and comments; counting brackets (a C-speed `count`)
settles almost every document without scanning.

The normal form (tokens joined by single spaces, comments and commas dropped) is what the
result cache keys on, so two spellings of one query share an entry.
"""

from __future__ import annotations

import re

from server.graphql.errors import PARSE_FAILED, GraphQLRequestError

# Tokens of the GraphQL lexical grammar that matter here: block strings, strings, comments,
# names, numbers, punctuators. Whitespace, line terminators, commas and the BOM are ignored.
_TOKEN = re.compile(
    r'"""(?:\\"""|[^"]|"(?!""))*"""'  # block string
    r'|"(?:\\.|[^"\\\n\r])*"'  # string
    r"|#[^\n\r]*"  # comment
    r"|\.\.\."  # spread
    r"|[!$&()\:=@\[\]{|}]"  # punctuators
    r"|-?[0-9][0-9.eE+\-]*"  # numbers (the parser checks their exact shape)
    r"|[_A-Za-z][_0-9A-Za-z]*"  # names
    r"|[^\s,\ufeff]"  # anything else: one character, left for the parser to refuse
)
_OPEN = frozenset("{[(")
_CLOSE = frozenset("}])")


def check_document(text: str, *, max_bytes: int, max_nesting: int) -> None:
    """Refuse a document over `max_bytes` (UTF-8) or with brackets (`{`, `[`, `(`) nested
    deeper than `max_nesting`, outside strings and comments. Raises `GraphQLRequestError`
    (`DOCUMENT_TOO_LARGE`, `DOCUMENT_TOO_DEEPLY_NESTED`)."""
    size = len(text)
    if size > max_bytes or (size * 4 > max_bytes and len(text.encode()) > max_bytes):
        raise GraphQLRequestError(
            "DOCUMENT_TOO_LARGE",
            f"the document is larger than {max_bytes} bytes",
            maxBytes=max_bytes,
        )
    if "\x00" in text:
        # The C parser reads a NUL as the end of the document and would ignore the rest.
        raise GraphQLRequestError(PARSE_FAILED, "the document contains a NUL character")
    if text.count("{") + text.count("[") + text.count("(") <= max_nesting:
        return  # cannot nest deeper than it has brackets
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in _OPEN:
            depth += 1
            if depth > max_nesting:
                raise GraphQLRequestError(
                    "DOCUMENT_TOO_DEEPLY_NESTED",
                    f"brackets are nested more than {max_nesting} deep",
                    maxNesting=max_nesting,
                )
        elif token in _CLOSE:
            depth -= 1


def normalize(text: str) -> str:
    """The document's tokens joined by single spaces (comments, commas, layout dropped)."""
    return " ".join(token for token in _TOKEN.findall(text) if not token.startswith("#"))
