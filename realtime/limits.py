"""The bounds of every cable connection, in and out (settings `FM_CABLE_*`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CableLimits:
    """Inbound and outbound bounds of every connection."""

    max_frame_bytes: int = 64 * 1024
    max_subscriptions: int = 100
    commands_per_second: float = 50.0
    command_burst: int = 100
    slow_consumer_bytes: int = 1024 * 1024
    slow_consumer_grace_s: float = 5.0
    max_connections_per_ip: int = 2000
    ping_interval_s: float = 3.0

    @property
    def slow_consumer_hard_bytes(self) -> int:
        """Unsent bytes past which a connection is cut off without grace."""
        return 4 * self.slow_consumer_bytes
