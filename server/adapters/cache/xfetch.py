"""Probabilistic early expiration (XFetch; Vattani, Chierichetti and Lowenstein, VLDB 2015).

A cached value remembers `delta`, how long it took to compute. A reader recomputes early when
`now - delta * beta * ln(rand()) >= expiry`, i.e. when `-delta * beta * ln(rand())` reaches the
time left. The chance grows as expiry nears and with the cost of the recomputation, so a hot
key is refreshed, by one reader, shortly before it expires instead of by a stampede after.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Random = Callable[[], float]


def should_refresh_early(delta_s: float, ttl_left_s: float, beta: float, rand: Random) -> bool:
    """Whether this read should recompute the value now (`rand` draws from (0, 1])."""
    if ttl_left_s <= 0:
        return True
    draw = rand()
    if draw <= 0.0:
        return True  # -ln(0) is infinite
    return -delta_s * beta * math.log(draw) >= ttl_left_s
