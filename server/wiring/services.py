"""The dependencies of one node, built once by the lifecycle and passed to the app factory."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from realtime.cable import CableLimits, CableServer
from realtime.channels import StateReaders
from realtime.graphql_socket import GraphQLWsLimits, GraphQLWsServer
from realtime.metrics import CableStatsCollector
from realtime.revocations import SessionRevocations
from server.adapters.cache import CachedLoader, CacheInvalidationListener, CacheStatsCollector
from server.adapters.cluster_health import ClusterHealth
from server.adapters.db.pools import Database
from server.adapters.db.router import ShardRouter
from server.adapters.images import ImageWorkers, IntakeLimits, open_storage
from server.adapters.purge import PurgeQueue, PurgeStatsCollector, make_purger
from server.adapters.ratelimit import LeasedRateLimiter, Limit, RateLimiter
from server.adapters.sessions import SessionStore
from server.common.lifecycle import NodeState
from server.common.logs import get_logger
from server.domain.carts import CartService, cart_view
from server.domain.catalog import STOCK_FRESH_S, CatalogService
from server.domain.checkout import CheckoutService, CheckoutSweeper
from server.domain.images import ImageService
from server.domain.inventory import current_stock
from server.domain.notifications import NotificationService
from server.domain.orders import OrderService
from server.domain.users import UserService
from server.graphql import GraphQLLimits, GraphQLService
from server.graphql.context import GraphQLDomain
from server.graphql.metrics import GraphQLStatsCollector
from server.wiring.data_metrics import DataStatsCollector
from server.wiring.metrics import NodeMetrics, RedisStatsCollector
from server.wiring.settings import Settings

# A checkout's reservation left 'held' this long is repaired by the sweeper (every node runs
# one; a sweep is safe to run concurrently): far above a saga's normal duration.
SHUTDOWN_STEP_TIMEOUT_S = 5.0
_log = get_logger("finalmarket.services")


@dataclass
class Services:
    """The wiring's container: everything one node is made of, built once by `open`.

    Only the wiring reads it: `server.wiring.app.make_app` hands each route the `Gate` and
    the domain services it uses, and GraphQL resolvers get a typed context; no handler,
    channel or resolver sees this object.

    Built by `server.wiring.node` (or a test) and handed to `server.wiring.app.make_app`;
    nothing here is a
    module global, so a test can run two nodes in one process.
    """

    settings: Settings
    db: Database
    redis: Any
    sessions: SessionStore
    cable: CableServer
    revocations: SessionRevocations
    router: ShardRouter
    cache: CachedLoader
    catalog: CatalogService
    sweeper: CheckoutSweeper
    cache_listener: CacheInvalidationListener
    rate_limiter: LeasedRateLimiter
    ip_limit: Limit
    user_limit: Limit
    images: ImageService
    users: UserService
    carts: CartService
    checkout: CheckoutService
    orders: OrderService
    notifications: NotificationService
    purges: PurgeQueue
    cluster_health: ClusterHealth | None = None  # on a Redis Cluster
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    state: NodeState = field(default_factory=NodeState)
    # Built by `open` once the rest exists (resolvers reach the services through it).
    graphql: GraphQLService = field(init=False)
    graphql_ws: GraphQLWsServer = field(init=False)

    def __post_init__(self) -> None:
        # Gauges read the lifecycle state when scraped, so there is one source of truth.
        self.metrics.http_in_flight.set_function(lambda: self.state.in_flight)
        self.metrics.draining.set_function(lambda: int(self.state.draining))
        self.metrics.registry.register(CacheStatsCollector(self.cache.all_stats))
        self.metrics.registry.register(CableStatsCollector(self.cable))
        self.metrics.registry.register(DataStatsCollector(self.router, self.catalog))
        self.metrics.registry.register(PurgeStatsCollector(self.purges))
        resubscriptions = {
            "broker": lambda: self.cable.broker.reconnects,
            "cache_invalidations": lambda: self.cache_listener.reconnects,
        }
        self.metrics.registry.register(RedisStatsCollector(resubscriptions, self.cluster_health))
        if self.cluster_health is not None:
            self.cluster_health.on_lost_writes.append(self.cable.redis_lost_writes)
            self.cluster_health.on_lost_writes.append(self.cache.redis_lost_writes)
            self.cluster_health.on_lost_writes.append(self.sessions.redis_lost_writes)

    @classmethod
    async def open(cls, settings: Settings) -> Services:
        """Open pools and the Redis client for `settings` (connections are made lazily)."""
        from server.adapters.redis_client import open_redis

        db = await Database.open(settings)
        redis = open_redis(settings)
        router = ShardRouter.for_settings(db, settings)
        cable = CableServer(
            StateReaders(stock=partial(current_stock, router), cart=partial(cart_view, router)),
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
            history_maxlen=settings.cable_history_limit,
            history_ttl_s=settings.cable_history_ttl_s,
            session_ttl_s=settings.cable_session_ttl_s,
            pong_timeout_s=settings.cable_pong_timeout_s,
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
            min_interval_s=settings.edge_purge_interval_s,
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
            ImageWorkers(
                settings.image_workers,
                settings.image_queue_limit,
                low_priority=settings.image_worker_priority == "low",
            ),
            IntakeLimits(settings.image_max_upload_bytes, settings.image_max_pixels),
            # Beside the variants: the same file system, never served (not a storage name).
            spool_dir=os.path.join(settings.image_storage_dir, ".spool"),
        )
        # A revoked session's sockets are closed on every node: the store announces each
        # revocation, and `revocations` asks the store which sessions still exist.
        sessions = SessionStore(redis, router)
        revocations = SessionRevocations(cable.watch, cable.publish, sessions.live)
        sessions.on_revoked = revocations.announce
        revocations.servers.append(cable)
        services = cls(
            settings=settings,
            db=db,
            redis=redis,
            sessions=sessions,
            cable=cable,
            revocations=revocations,
            router=router,
            cache=cache,
            catalog=catalog,
            cache_listener=CacheInvalidationListener(redis, cache),
            sweeper=CheckoutSweeper(
                router,
                cable.publish,
                purge=purges.submit,
                period_s=settings.checkout_sweep_period_s,
                stale_after_s=settings.checkout_stale_after_s,
                cart_key_ttl_s=settings.cart_idempotency_ttl_s,
            ),
            rate_limiter=LeasedRateLimiter(RateLimiter(redis)),
            ip_limit=Limit("ip", settings.ratelimit_ip_per_second, settings.ratelimit_ip_burst),
            user_limit=Limit(
                "user", settings.ratelimit_user_per_second, settings.ratelimit_user_burst
            ),
            images=images,
            users=UserService(router),
            carts=CartService(router, cable.publish),
            checkout=CheckoutService(router, cable.publish, purge=purges.submit),
            orders=OrderService(router),
            notifications=NotificationService(router, cable.publish),
            purges=purges,
            cluster_health=(
                ClusterHealth(redis, settings.readiness_timeout_s)
                if settings.redis_cluster
                else None
            ),
        )
        graphql = GraphQLService(
            GraphQLDomain(
                catalog=catalog,
                carts=services.carts,
                checkout=services.checkout,
                orders=services.orders,
                notifications=services.notifications,
                users=services.users,
                watch=cable.watch,
            ),
            sessions=services.sessions,
            redis=redis,
            cache=cache,
            rate_limiter=services.rate_limiter,
            limits=GraphQLLimits(
                max_cost=settings.graphql_max_cost,
                max_depth=settings.graphql_max_depth,
                max_document_bytes=settings.graphql_max_document_bytes,
                persisted_query_ttl_s=settings.graphql_persisted_query_ttl_s,
                result_cache_ttl_s=settings.graphql_result_cache_ttl_s,
                throttle_maximum=settings.graphql_throttle_maximum,
                throttle_restore_per_second=settings.graphql_throttle_restore_per_second,
            ),
        )
        await graphql.start()
        services.graphql = graphql
        services.graphql_ws = GraphQLWsServer(
            graphql,
            GraphQLWsLimits(
                max_message_bytes=settings.graphql_ws_max_message_bytes,
                max_operations=settings.graphql_ws_max_subscriptions,
                init_timeout_s=settings.graphql_ws_init_timeout_s,
                messages_per_second=settings.graphql_ws_messages_per_second,
                message_burst=settings.graphql_ws_message_burst,
                max_connections_per_ip=settings.cable_max_connections_per_ip,
            ),
        )
        revocations.servers.append(services.graphql_ws)
        services.metrics.registry.register(GraphQLStatsCollector(graphql, services.graphql_ws))
        return services

    def start(self) -> None:
        """Start background work (broker reader, pings); call on the serving loop."""
        self.cable.start()
        self.cache_listener.start()
        self.sweeper.start()
        self.graphql_ws.start()
        self.revocations.start()
        self.purges.start()
        if self.cluster_health is not None:
            self.cluster_health.start()

    async def close(self) -> None:
        """Stop background work, release pools and Redis connections.

        Each step is bounded, so one stuck dependency cannot hold a node's exit forever.
        """
        for name, step in (
            ("sweeper", self.sweeper.stop),
            ("revocations", self.revocations.stop),
            ("graphql", self.graphql_ws.stop),
            ("cable", self.cable.stop),
            ("cache_listener", self.cache_listener.stop),
            ("images", self.images.aclose),
            ("edge_purges", self.purges.stop),
            ("cache", self.cache.aclose),
            ("cluster_health", self._stop_cluster_health),
            ("router", self.router.close),
        ):
            try:
                await asyncio.wait_for(step(), SHUTDOWN_STEP_TIMEOUT_S)
            except TimeoutError:
                _log.warning("shutdown_step_timed_out", step=name)
        await self.db.close()
        await self.redis.aclose()

    async def _stop_cluster_health(self) -> None:
        if self.cluster_health is not None:
            await self.cluster_health.stop()
