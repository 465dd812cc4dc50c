"""The context every resolver receives as `ctx`: the node's domain services, the caller, and
the request's DataLoaders.

tartiflette's schema registry is global per schema name, so resolvers are plain module
functions; everything node-specific reaches them through this object, never through module
globals. Two nodes in one process (the tests) therefore never see each other's services.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from server.adapters.sessions import Session
from server.domain.carts import CartService
from server.domain.catalog import CatalogService
from server.domain.checkout import CheckoutService
from server.domain.notifications import NotificationService
from server.domain.orders import OrderService
from server.domain.users import UserService
from server.graphql.errors import Forbidden, Unauthenticated
from server.graphql.loaders import Loaders

# `watch(stream)`: follow a stream from any node while the context is open (the realtime hub's
# `CableServer.watch`); subscriptions read their events from it.
Watch = Callable[[str], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class GraphQLDomain:
    """What resolvers may use: the node's domain services and the stream follower, nothing
    else (no pools, no Redis, no sockets). Built once per node by the wiring."""

    catalog: CatalogService
    carts: CartService
    checkout: CheckoutService
    orders: OrderService
    notifications: NotificationService
    users: UserService
    watch: Watch


class RequestContext:
    """Per request (or per subscription): who asks, on which node; loaders made on first use."""

    __slots__ = ("_loaders", "domain", "remote_ip", "session")

    def __init__(self, domain: GraphQLDomain, session: Session | None, remote_ip: str) -> None:
        self.domain = domain
        self.session = session
        self.remote_ip = remote_ip
        self._loaders: Loaders | None = None

    @property
    def loaders(self) -> Loaders:
        """This request's DataLoaders (each key loaded at most once, in batches)."""
        loaders = self._loaders
        if loaders is None:
            loaders = self._loaders = Loaders(
                self.domain.catalog, self.domain.users, self.domain.carts
            )
        return loaders

    def require_user(self) -> Session:
        """The signed-in caller, or an `UNAUTHENTICATED` error."""
        if self.session is None:
            raise Unauthenticated(
                "sign in first (Authorization: Bearer <token>, the session cookie, or on "
                "WebSockets the connection_init payload or ?token=)"
            )
        return self.session

    def require_admin(self) -> Session:
        """The signed-in administrator, or an `UNAUTHENTICATED`/`FORBIDDEN` error."""
        session = self.require_user()
        if not session.is_admin:
            raise Forbidden("this needs an administrator")
        return session
