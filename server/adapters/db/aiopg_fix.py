"""A fix for aiopg under uvloop: a refused connection must not leave a dead poll handle.

When PostgreSQL refuses a connection, libpq closes the socket while aiopg is waiting to write
to it. aiopg's `Connection._ready` then forgets the bad descriptor after removing only its
*reader*, so uvloop keeps a closed poll handle for that descriptor number with the writer still
registered, and the next connection that gets the same number fails in `add_reader` with
`RuntimeError: unable to perform operation on <UVPoll closed=True>` (aio-libs/aiopg#909, open;
the node runs on uvloop). Every other reconnect to a stopped primary or replica then raised
that instead of `OperationalError`, and the router's fallbacks never saw a connection error.

`install()` wraps `_ready` to also remove the writer in exactly that case. Idempotent.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from aiopg.connection import Connection

_original_ready = Connection._ready


def _ready(weak_self: weakref.ref[Any]) -> None:
    connection = weak_self()
    if connection is None:
        return
    fileno, writing = connection._fileno, connection._writing
    _original_ready(weak_self)
    if writing and fileno is not None and connection._fileno is None:
        with contextlib.suppress(OSError):
            connection._loop.remove_writer(fileno)


def install() -> None:
    """Patch `aiopg.connection.Connection._ready` (once)."""
    if Connection._ready is not _ready:
        Connection._ready = staticmethod(_ready)  # type: ignore[method-assign]
