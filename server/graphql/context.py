"""The context every resolver receives as `ctx`: the node's services, the caller, and the
request's DataLoaders.

tartiflette's schema registry is global per schema name, so resolvers are plain module
functions; everything node-specific reaches them through this object, never through module
globals. Two nodes in one process (the tests) therefore never see each other's services.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.graphql.errors import Forbidden, Unauthenticated
from server.graphql.loaders import Loaders
from server.adapters.sessions import Session

if TYPE_CHECKING:
    from server.wiring.services import Services


class RequestContext:
    """Per request (or per subscription): who asks, on which node; loaders made on first use."""

    __slots__ = ("_loaders", "remote_ip", "services", "session")

    def __init__(self, services: Services, session: Session | None, remote_ip: str) -> None:
        self.services = services
        self.session = session
        self.remote_ip = remote_ip
        self._loaders: Loaders | None = None

    @property
    def loaders(self) -> Loaders:
        """This request's DataLoaders (each key loaded at most once, in batches)."""
        loaders = self._loaders
        if loaders is None:
            loaders = self._loaders = Loaders(self.services)
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
