"""Per-connection command allowance: a token bucket kept as two floats on the connection.

Connections hold thousands at a time, so the bucket is not an object of its own: each
connection keeps `allowance` and `refilled_at`, and `take` computes the next state.
"""

from __future__ import annotations


def take(
    allowance: float, refilled_at: float, now: float, per_second: float, burst: float
) -> tuple[bool, float]:
    """(whether one more command is allowed, the allowance left), after refilling at
    `per_second` since `refilled_at` up to `burst`."""
    allowance = min(burst, allowance + (now - refilled_at) * per_second)
    if allowance < 1.0:
        return False, allowance
    return True, allowance - 1.0
