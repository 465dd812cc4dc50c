"""Strict JSON input: lone surrogates are refused, everything else reads as `json.loads` does."""

from __future__ import annotations

import json

import pytest

from server.common import jsontext


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "\\ud800"}',  # a lone high surrogate
        '{"a": "\\udfff"}',  # a lone low surrogate
        '["ok", {"deep": ["\\uDBFF x"]}]',  # upper case, nested, followed by text
        '{"\\ud800": 1}',  # in a key
        '{"a": "\\ude00\\ud83d"}',  # a pair in the wrong order is two lone ones
    ],
)
def test_lone_surrogates_are_refused_as_str_and_as_bytes(text: str) -> None:
    for given in (text, text.encode(), text.encode("utf-16")):
        with pytest.raises(jsontext.LoneSurrogate):
            jsontext.loads(given)


@pytest.mark.parametrize(
    "text",
    [
        '{"emoji": "\\ud83d\\ude00", "plain": "caf\\u00e9", "raw": "😀"}',
        '{"looks_like": "\\\\ud800"}',  # an escaped backslash, not a surrogate escape
        "[1, 2.5, null, true]",
    ],
)
def test_everything_else_reads_as_json_loads_does(text: str) -> None:
    for given in (text, text.encode(), text.encode("utf-16")):
        assert jsontext.loads(given) == json.loads(text)


def test_lone_surrogate_is_a_value_error_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        jsontext.loads('"\\ud800"')
