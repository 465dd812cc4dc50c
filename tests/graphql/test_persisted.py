"""Automatic persisted queries: an unknown hash is PERSISTED_QUERY_NOT_FOUND; the document
sent with its hash registers it (on every node); a hash-only GET then answers and may be
cached by a CDN."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.helpers.cable import ExtraNode
from tests.helpers.graphql import codes, gql, result

pytestmark = pytest.mark.usefixtures("clean_data")

QUERY = "query Page($n: Int) { products(first: $n) { edges { node { id name } } } }"
SHA = hashlib.sha256(QUERY.encode()).hexdigest()


def _persisted(sha: str = SHA) -> dict[str, Any]:
    return {"persistedQuery": {"version": 1, "sha256Hash": sha}}


@pytest.mark.gen_test(timeout=30)
async def test_hash_only_get_is_not_found_then_registered_then_answered_and_cacheable(
    client: Any, base_url: str, node_b: ExtraNode, products: list[int]
) -> None:
    unknown = await gql(client, base_url, method="GET", variables={"n": 2}, extensions=_persisted())
    assert codes(result(unknown)) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert unknown.headers["Cache-Control"] == "no-store"

    registered = result(await gql(client, base_url, QUERY, {"n": 2}, extensions=_persisted()))
    assert [e["node"]["id"] for e in registered["data"]["products"]["edges"]] == [
        str(products[0]),
        str(products[1]),
    ]

    for url in (base_url, f"http://127.0.0.1:{node_b.port}"):  # registered for every node
        answered = await gql(client, url, method="GET", variables={"n": 2}, extensions=_persisted())
        assert result(answered)["data"] == registered["data"]
        assert answered.headers["Cache-Control"].startswith("public, max-age=")
        assert "Accept" in answered.headers["Vary"]


@pytest.mark.gen_test(timeout=30)
async def test_document_whose_hash_differs_is_refused_and_not_registered(
    client: Any, base_url: str, products: list[int]
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    refused = result(await gql(client, base_url, QUERY, {"n": 1}, extensions=_persisted(wrong)))
    assert codes(refused) == ["PERSISTED_QUERY_HASH_MISMATCH"]
    later = result(await gql(client, base_url, method="GET", extensions=_persisted(wrong)))
    assert codes(later) == ["PERSISTED_QUERY_NOT_FOUND"]


@pytest.mark.gen_test(timeout=30)
async def test_malformed_or_unsupported_persisted_query_extensions_are_refused(
    client: Any, base_url: str
) -> None:
    bad_version = {"persistedQuery": {"version": 2, "sha256Hash": SHA}}
    assert codes(result(await gql(client, base_url, extensions=bad_version))) == [
        "PERSISTED_QUERY_NOT_SUPPORTED"
    ]
    bad_hash = {"persistedQuery": {"version": 1, "sha256Hash": "xyz"}}
    malformed = await gql(client, base_url, extensions=bad_hash)
    assert codes(result(malformed, 400)) == ["BAD_REQUEST"]  # not a well-formed request


@pytest.mark.gen_test(timeout=30)
async def test_invalid_document_is_not_registered(client: Any, base_url: str) -> None:
    query = "{ nope }"
    sha = hashlib.sha256(query.encode()).hexdigest()
    refused = result(await gql(client, base_url, query, extensions=_persisted(sha)))
    assert codes(refused) == ["GRAPHQL_VALIDATION_FAILED"]
    later = result(await gql(client, base_url, method="GET", extensions=_persisted(sha)))
    assert codes(later) == ["PERSISTED_QUERY_NOT_FOUND"]
