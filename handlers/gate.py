"""What every handler needs from its node at the door, and nothing more: the lifecycle
(draining, requests in flight), how callers are identified (sessions) and limited (rate
limits, body size), and the cookie and Origin policy.

Built once by the wiring (`server.wiring.app.make_app`) and handed to every route with the
domain services that route uses, through Tornado's `initialize()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.adapters.ratelimit import LeasedRateLimiter, Limit
from server.adapters.sessions import SessionStore
from server.common.lifecycle import NodeState


@dataclass(frozen=True, slots=True)
class Gate:
    """The node's admission policy, shared by all handlers of one node."""

    lifecycle: NodeState
    sessions: SessionStore
    rate_limiter: LeasedRateLimiter
    ip_limit: Limit
    user_limit: Limit
    max_body_bytes: int
    cookie_secure: bool
    allowed_origins: frozenset[str]
