"""One node's life: open services, listen, serve until a signal, then drain and stop.

Shutdown order on SIGTERM/SIGINT (what a rolling restart behind a load balancer needs):
1. mark the node draining, so /readyz answers 503 and the balancer stops routing to it;
2. keep serving for `drain_delay_s` while the balancer notices;
3. close the listener (no new connections), run the drain hooks (the realtime hub tells its
   clients to reconnect elsewhere), and wait up to `shutdown_timeout_s` for requests in flight;
4. close remaining connections, pools and Redis, and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tornado.netutil import bind_sockets

from server.adapters.http1 import make_http_server
from server.common.logs import get_logger
from server.wiring.app import make_app
from server.wiring.metrics import HttpServerStatsCollector
from server.wiring.services import Services
from server.wiring.settings import Settings

_log = get_logger("finalmarket.node")


class Node:
    """A running node: its services, its HTTP server and its shutdown sequence."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.app = make_app(services)
        self.server = make_http_server(self.app, services.settings)
        services.metrics.registry.register(
            HttpServerStatsCollector(getattr(self.server, "refusals", None))
        )
        self.port: int | None = None
        self.drain_hooks: list[Callable[[], Awaitable[None]]] = [
            services.cable.drain,
            services.graphql_ws.drain,
        ]

    async def listen(self) -> int:
        """Bind the configured address (port 0 picks a free one) and return the port."""
        settings = self.services.settings
        sockets = bind_sockets(
            settings.port, settings.host, reuse_port=False, backlog=settings.listen_backlog
        )
        await self.server.listen_on(sockets)
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def shutdown(self) -> None:
        """Drain and stop, in the order described in the module docstring."""
        settings, state = self.services.settings, self.services.state
        state.draining = True
        _log.info("draining", drain_delay_s=settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
        self.server.stop()
        for hook in self.drain_hooks:
            await hook()
        if not await self.services.state.wait_idle(settings.shutdown_timeout_s):
            _log.warning("shutdown_timeout", abandoned_requests=self.services.state.in_flight)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.close_all_connections(), 1.0)
        await self.services.close()
        _log.info("stopped")


async def run_node(settings: Settings, on_listening: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    services = await Services.open(settings)
    services.start()
    node = Node(services)
    settle_heap()
    port = await node.listen()
    _log.info("listening", host=settings.host, port=port, node_id=settings.node_id)
    if on_listening is not None:
        on_listening(port)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await node.shutdown()


def settle_heap() -> None:
    """Move everything start-up built (modules, schema, settings, pools) out of the garbage
    collector's view, so its full collections scan only what serving creates: a full
    collection over the start-up heap stalled the loop for ~50 ms, the whole p99 of a cached
    REST read (docs/decisions.md)."""
    gc.collect()
    gc.freeze()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
