"""Which cable connections are stuck, found on a timer so the fan-out path checks nothing.

Two kinds: slow consumers (a connection whose unsent bytes passed the soft bound: cut off
after the grace period, or sooner when past the hard bound and not draining), and, for
extended-protocol clients that opted in to pongs, silent clients (not heard from within the
pong timeout: their network is gone though the socket is not; they are told `no_pong` and
reconnect). The cable server calls `sweep()` every `SLOW_CONSUMER_SWEEP_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from realtime.connection import CableConnection
from realtime.limits import CableLimits

SLOW_CONSUMER_SWEEP_S = 0.25
# Past the hard bound, a connection is cut off once its backlog has not shrunk for this long
# (several sweeps: a reader on a busy machine may miss one or two without being stuck).
HARD_BOUND_STALL_S = 1.0

Refuse = Callable[[CableConnection, str, str], None]


class Liveness:
    """The backlogged and pong-watched connections of one node."""

    def __init__(self, limits: CableLimits, pong_timeout_s: float, refuse: Refuse) -> None:
        self.limits = limits
        self.hard_bytes = limits.slow_consumer_hard_bytes
        self.pong_timeout_s = pong_timeout_s
        self.refuse = refuse  # logs a refusal: (conn, kind, reason)
        # Per backlogged connection: [grace deadline, unsent at the last sweep, since when its
        # backlog has not shrunk past the hard bound (0: it has)].
        self._paused: dict[CableConnection, list[float]] = {}
        self._pong_watch: dict[CableConnection, None] = {}  # extended clients sending pongs

    def writer_paused(self, conn: CableConnection) -> None:
        """`conn` holds more unsent bytes than the soft bound: start its grace period."""
        self._paused[conn] = [time.monotonic() + self.limits.slow_consumer_grace_s, 0.0, 0.0]

    def writer_resumed(self, conn: CableConnection) -> None:
        """`conn` caught up."""
        self._paused.pop(conn, None)

    def pong_received(self, conn: CableConnection) -> None:
        """An extended client sent `pong`: from now on it must be heard from within the pong
        timeout (`FM_CABLE_PONG_TIMEOUT_S`), or it is told `no_pong` and closed."""
        ext = conn.ext
        if ext is not None and not ext.pongs and self.pong_timeout_s > 0:
            ext.pongs = True
            self._pong_watch[conn] = None

    def forget(self, conn: CableConnection) -> None:
        """`conn` is gone."""
        self._paused.pop(conn, None)
        self._pong_watch.pop(conn, None)

    def sweep(self) -> None:
        """Cut off the stuck connections."""
        self._cut_off_slow_consumers()
        if self._pong_watch:
            self._cut_off_silent_clients()

    def _cut_off_slow_consumers(self) -> None:
        """Cut off backlogged connections that are past the hard bound and not draining
        (their backlog no smaller for `HARD_BOUND_STALL_S`), or past the soft bound for longer
        than the grace period; a reader working through a big burst is never mistaken for a
        stuck one."""
        now = time.monotonic()
        for conn, watch in list(self._paused.items()):
            deadline, previous, stalled_since = watch
            transport = conn.transport
            unsent = transport.get_write_buffer_size() if transport is not None else 0
            stalled = unsent > self.hard_bytes and unsent >= previous
            if stalled and stalled_since and now - stalled_since >= HARD_BOUND_STALL_S:
                reason = "unsent bytes over the hard bound and not draining"
            elif deadline <= now:
                reason = "over the soft bound for longer than the grace period"
            else:
                watch[1] = float(unsent)
                watch[2] = (stalled_since or now) if stalled else 0.0
                continue
            del self._paused[conn]
            conn.cut_off_slow(reason)

    def _cut_off_silent_clients(self) -> None:
        """Disconnect pong-sending clients not heard from within the pong timeout; they
        reconnect and restore."""
        deadline = time.monotonic() - self.pong_timeout_s
        for conn in list(self._pong_watch):
            ext = conn.ext
            if ext is not None and ext.heard_at < deadline:
                del self._pong_watch[conn]
                self.refuse(conn, "no_pong", f"silent for over {self.pong_timeout_s} s")
                conn.disconnect("no_pong", reconnect=True)
