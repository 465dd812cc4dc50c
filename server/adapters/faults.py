"""Driver errors in the domain's words, decided in one place: the PostgreSQL and Redis
drivers' "busy or unreachable" failures are `Unavailable`; everything else stays what it is.

Handlers, GraphQL and the cable ask this module rather than import psycopg2 or redis.
"""

from __future__ import annotations

import psycopg2
from redis.exceptions import (
    ClusterDownError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.common.errors import DomainError, Unavailable

# A pool wait that timed out is a plain TimeoutError; a refused or dropped connection is the
# driver's own error. On a Redis Cluster, a master's death until its replica takes over shows as
# CLUSTERDOWN / TRYAGAIN answers or slots no reachable node serves.
_OVERLOAD = (
    TimeoutError,
    psycopg2.OperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)
UNAVAILABLE_DETAIL = "a backing service is busy or down; retry"


def as_domain_error(error: BaseException) -> DomainError | None:
    """`error` itself when it is a domain error, `Unavailable` for a driver's overload or
    connection failure, else None (a bug: the caller reports it as an internal error)."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, _OVERLOAD):
        return Unavailable(UNAVAILABLE_DETAIL)
    return None
