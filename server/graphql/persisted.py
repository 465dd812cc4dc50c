"""Automatic persisted queries (Apollo's protocol): documents registered by their SHA-256.

A client first sends only `extensions.persistedQuery.sha256Hash`; an unknown hash answers
`PERSISTED_QUERY_NOT_FOUND`, and the client sends the document with its hash, which registers
it (once the hash is checked and the document is valid). From then on a GET carrying only the
hash is a short, cacheable URL. Documents live in Redis (shared by the nodes, expiring
`ttl_s` after their last registration), with a small per-node copy in front: a hash names
exactly one document, so a local copy can never be stale.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Any

from server.graphql.errors import (
    BAD_REQUEST,
    PERSISTED_QUERY_HASH_MISMATCH,
    PERSISTED_QUERY_NOT_SUPPORTED,
    GraphQLRequestError,
)

_HASH = re.compile(r"^[0-9a-f]{64}$")
LOCAL_ENTRIES = 1000


def requested_hash(extensions: Any) -> str | None:
    """The hash of `extensions.persistedQuery`, None without one; `GraphQLRequestError` when
    it is malformed or of an unknown version."""
    if not isinstance(extensions, dict) or "persistedQuery" not in extensions:
        return None
    persisted = extensions["persistedQuery"]
    if not isinstance(persisted, dict):
        raise GraphQLRequestError(BAD_REQUEST, "extensions.persistedQuery must be an object")
    if persisted.get("version") != 1:
        raise GraphQLRequestError(
            PERSISTED_QUERY_NOT_SUPPORTED, "only persistedQuery version 1 is supported"
        )
    sha = persisted.get("sha256Hash")
    if not isinstance(sha, str) or not _HASH.match(sha):
        raise GraphQLRequestError(
            BAD_REQUEST, "persistedQuery.sha256Hash must be 64 lower-case hex digits"
        )
    return sha


def check_hash(query: str, sha: str) -> None:
    """Refuse a document whose SHA-256 is not `sha` (`PERSISTED_QUERY_HASH_MISMATCH`)."""
    if hashlib.sha256(query.encode()).hexdigest() != sha:
        raise GraphQLRequestError(
            PERSISTED_QUERY_HASH_MISMATCH, "provided sha256Hash does not match the query"
        )


class PersistedQueries:
    """Registered documents by hash: Redis, with a bounded per-node copy."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._local: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def _key(sha: str) -> str:
        return f"gql:apq:{sha}"

    async def get(self, sha: str) -> str | None:
        """The document registered under `sha`, or None."""
        query = self._local.get(sha)
        if query is not None:
            self._local.move_to_end(sha)
            return query
        raw = await self._redis.get(self._key(sha))
        if raw is None:
            return None
        query = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._remember(sha, query)
        return query

    async def put(self, sha: str, query: str) -> None:
        """Register `query` (whose hash was checked) under `sha`."""
        await self._redis.set(self._key(sha), query.encode(), ex=self._ttl_s)
        self._remember(sha, query)

    def _remember(self, sha: str, query: str) -> None:
        self._local[sha] = query
        if len(self._local) > LOCAL_ENTRIES:
            self._local.popitem(last=False)
