"""The dependencies of one node, built once by the lifecycle and passed to the app factory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from realtime.cable import CableLimits, CableServer
from realtime.metrics import CableStatsCollector
from server.adapters.cache import CachedLoader, CacheInvalidationListener, CacheStatsCollector
from server.domain.catalog import STOCK_FRESH_S, CatalogService
from server.domain.checkout import CheckoutSweeper
from server.wiring.data_metrics import DataStatsCollector
from server.adapters.db.pools import Database
from server.adapters.db.router import ShardRouter
from server.graphql import GraphQLService
from server.adapters.images import ImageWorkers, IntakeLimits, open_storage
from server.domain.images import ImageService
from server.common.logs import get_logger
from server.wiring.metrics import NodeMetrics
from server.adapters.purge import PurgeQueue, PurgeStatsCollector, make_purger
from server.adapters.ratelimit import LeasedRateLimiter, Limit, RateLimiter
from server.adapters.sessions import SessionStore
from server.wiring.settings import Settings

# A checkout's reservation left 'held' this long is repaired by the sweeper (every node runs
# one; a sweep is safe to run concurrently): far above a saga's normal duration.
SHUTDOWN_STEP_TIMEOUT_S = 5.0
_log = get_logger("finalmarket.services")


@dataclass
class NodeState:
    """Lifecycle flags the handlers read (readiness goes 503 once draining starts), and the
    count of requests in flight that shutdown waits for."""

    draining: bool = False
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def request_started(self) -> None:
        """A request entered a handler."""
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        """A request left its handler."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if `timeout_s` passed first."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass
class Services:
    """Everything handlers reach: settings, pools, Redis, metrics, lifecycle state.

    Built by `server.wiring.node` (or a test) and handed to `server.wiring.app.make_app`; nothing here is a
    module global, so a test can run two nodes in one process.
    """

    settings: Settings
    db: Database
    redis: Any
    sessions: SessionStore
    cable: CableServer
    router: ShardRouter
    cache: CachedLoader
    catalog: CatalogService
    sweeper: CheckoutSweeper
    cache_listener: CacheInvalidationListener
    rate_limiter: LeasedRateLimiter
    ip_limit: Limit
    user_limit: Limit
    images: ImageService
    purges: PurgeQueue
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    state: NodeState = field(default_factory=NodeState)
    # Built by `open` once the rest exists (resolvers reach the services through it).
    graphql: GraphQLService = field(init=False)

    def __post_init__(self) -> None:
        # Gauges read the lifecycle state when scraped, so there is one source of truth.
        self.metrics.http_in_flight.set_function(lambda: self.state.in_flight)
        self.metrics.draining.set_function(lambda: int(self.state.draining))
        self.metrics.registry.register(CacheStatsCollector(self.cache.all_stats))
        self.metrics.registry.register(CableStatsCollector(self.cable))
        self.metrics.registry.register(DataStatsCollector(self.router, self.catalog))
        self.metrics.registry.register(PurgeStatsCollector(self.purges))

    @classmethod
    async def open(cls, settings: Settings) -> Services:
        """Open pools and the Redis client for `settings` (connections are made lazily)."""
        from server.adapters.redis_client import open_redis

        db = await Database.open(settings)
        redis = open_redis(settings)
        router = ShardRouter.for_settings(db, settings)
        cable = CableServer(
            router,
            redis,
            settings.node_id,
            limits=CableLimits(
                max_frame_bytes=settings.cable_max_frame_bytes,
                max_subscriptions=settings.cable_max_subscriptions,
                commands_per_second=settings.cable_commands_per_second,
                command_burst=settings.cable_command_burst,
                slow_consumer_bytes=settings.cable_slow_consumer_bytes,
                slow_consumer_grace_s=settings.cable_slow_consumer_grace_s,
                max_connections_per_ip=settings.cable_max_connections_per_ip,
                ping_interval_s=settings.cable_ping_interval_s,
            ),
            benchmark_channel=settings.benchmark_channel,
            sharded_pubsub=settings.redis_cluster,
            presence_ttl_s=settings.presence_ttl_s,
            history_maxlen=settings.stream_history_maxlen,
        )
        cache = CachedLoader(
            redis,
            node_id=settings.node_id,
            local_max_entries=settings.cache_local_max_entries,
            local_max_staleness_s=settings.cache_local_max_staleness_s,
        )
        purges = PurgeQueue(
            make_purger(settings.edge_purge, settings.edge_purge_url),
            settings.edge_purge_queue_limit,
        )
        catalog = CatalogService(
            router,
            cache,
            cable.publish,
            stock_fresh_s=min(STOCK_FRESH_S, settings.cache_local_max_staleness_s),
            purge=purges.submit,
        )
        images = ImageService(
            catalog,
            open_storage(settings.image_storage, settings.image_storage_dir),
            ImageWorkers(settings.image_workers, settings.image_queue_limit),
            IntakeLimits(settings.image_max_upload_bytes, settings.image_max_pixels),
        )
        services = cls(
            settings=settings,
            db=db,
            redis=redis,
            sessions=SessionStore(redis),
            cable=cable,
            router=router,
            cache=cache,
            catalog=catalog,
            cache_listener=CacheInvalidationListener(redis, cache),
            sweeper=CheckoutSweeper(
                router,
                cable.publish,
                period_s=settings.checkout_sweep_period_s,
                stale_after_s=settings.checkout_stale_after_s,
            ),
            rate_limiter=LeasedRateLimiter(RateLimiter(redis)),
            ip_limit=Limit("ip", settings.ratelimit_ip_per_second, settings.ratelimit_ip_burst),
            user_limit=Limit(
                "user", settings.ratelimit_user_per_second, settings.ratelimit_user_burst
            ),
            images=images,
            purges=purges,
        )
        services.graphql = await GraphQLService.open(services)
        return services

    def start(self) -> None:
        """Start background work (broker reader, pings); call on the serving loop."""
        self.cable.start()
        self.cache_listener.start()
        self.sweeper.start()
        self.graphql.start()
        self.purges.start()

    async def close(self) -> None:
        """Stop background work, release pools and Redis connections.

        Each step is bounded, so one stuck dependency cannot hold a node's exit forever.
        """
        for name, step in (
            ("sweeper", self.sweeper.stop),
            ("graphql", self.graphql.stop),
            ("cable", self.cable.stop),
            ("cache_listener", self.cache_listener.stop),
            ("images", self.images.aclose),
            ("edge_purges", self.purges.stop),
            ("cache", self.cache.aclose),
            ("router", self.router.close),
        ):
            try:
                await asyncio.wait_for(step(), SHUTDOWN_STEP_TIMEOUT_S)
            except TimeoutError:
                _log.warning("shutdown_step_timed_out", step=name)
        await self.db.close()
        await self.redis.aclose()
