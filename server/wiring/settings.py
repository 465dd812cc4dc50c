"""One typed settings object for a node, built from `config/*.toml` and `FM_*` variables.

Precedence, highest first: `FM_*` environment variables, the file named by `FM_CONFIG`,
`config/local.toml` (not in git: personal overrides and secrets), `config/finalmarket.toml`
(checked in: operational defaults), and the defaults declared on each field below.

Every field carries a description and a group; the README's configuration table is generated
from them (`finalmarket settings --markdown`), and a test keeps the two in step.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from server.adapters.db.dsn import ShardDsn
from server.common.logs import configure_logging

ENV_PREFIX = "FM_"
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
MIN_SECRET_KEY_CHARS = 32


def _group(name: str) -> dict[str, Any]:
    return {"group": name}


class Settings(BaseSettings):
    """Everything a node needs to know about its environment, validated once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    # --- node -------------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1", description="Address the node listens on.", json_schema_extra=_group("node")
    )
    port: int = Field(
        8888,
        ge=0,
        le=65535,
        description="TCP port of the node (0: any free port, logged at start).",
        json_schema_extra=_group("node"),
    )
    node_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of this node in logs, metrics and broker envelopes "
        "(default: hostname-pid).",
        json_schema_extra=_group("node"),
    )
    secret_key: SecretStr = Field(
        description=f"Secret for signing cookies and tokens, at least {MIN_SECRET_KEY_CHARS} "
        "characters. Required; `finalmarket dev` generates one into its data directory.",
        json_schema_extra=_group("node"),
    )
    trust_forwarded_headers: bool = Field(
        False,
        description="Take the client address and scheme from `X-Forwarded-For`/`X-Real-Ip` and "
        "`X-Forwarded-Proto` (only behind a proxy that sets them: anyone can send them).",
        json_schema_extra=_group("node"),
    )
    listen_backlog: int = Field(
        2048,
        ge=16,
        le=65535,
        description="Pending connections the kernel queues for the node (capped by "
        "`net.core.somaxconn`). Tornado's 128 overflowed when hundreds of clients reconnect "
        "at once, and each dropped SYN waits a second or more to be retried.",
        json_schema_extra=_group("node"),
    )
    http_server: Literal["httptools", "tornado"] = Field(
        "httptools",
        description="HTTP/1.1 connection layer under Tornado's application: "
        "`httptools` (llhttp in an asyncio protocol, `server/adapters/http1.py`) "
        "or Tornado's own `HTTPServer`.",
        json_schema_extra=_group("node"),
    )
    http_idle_timeout_s: float = Field(
        75.0,
        gt=0,
        le=3600,
        description="Close a keep-alive HTTP connection idle this long (keep it above a load "
        "balancer's own upstream keep-alive timeout).",
        json_schema_extra=_group("node"),
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Longest time a request's line and headers may take to arrive (408 "
        "beyond; slowloris). `httptools` server only.",
        json_schema_extra=_group("node"),
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest pause between pieces of a request body (408 beyond). "
        "`httptools` server only.",
        json_schema_extra=_group("node"),
    )
    http_refusal_hold_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="After answering 429 on a client's own keep-alive connection, read "
        "nothing more from it, nor from new connections of its address, for this long (at "
        "most the answer's `Retry-After`; plus up to half again at random): a flood then "
        "costs one refusal per connection per hold. Off behind a trusted proxy "
        "(`FM_TRUST_FORWARDED_HEADERS`), whose connections carry other clients too. 0 turns "
        "it off. `httptools` server only.",
        json_schema_extra=_group("node"),
    )
    http_max_header_bytes: int = Field(
        64 * 1024,
        ge=4096,
        le=1024 * 1024,
        description="Largest request line plus headers (431 beyond).",
        json_schema_extra=_group("node"),
    )
    cookie_secure: bool = Field(
        True,
        description="Mark session cookies `Secure` (browsers still accept them from "
        "http://localhost and http://127.0.0.1).",
        json_schema_extra=_group("node"),
    )
    debug: bool = Field(
        False,
        description="Show tracebacks in error responses. Never in production.",
        json_schema_extra=_group("node"),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written to the log.", json_schema_extra=_group("node")
    )
    log_format: Literal["json", "console"] = Field(
        "json",
        description="`json`: one JSON object per line; `console`: human-readable.",
        json_schema_extra=_group("node"),
    )
    log_buffer_lines: int = Field(
        16384,
        ge=1,
        description="Log lines held in memory for the background writer (stderr). When the "
        "sink is slower than the node (a stalled pipe, a full disk), lines beyond this are "
        "dropped and counted in `fm_log_lines_dropped_total`; requests never wait for the log.",
        json_schema_extra=_group("node"),
    )
    log_flush_interval_s: float = Field(
        0.1,
        gt=0,
        description="How often the log writer writes out what is buffered: a line reaches "
        "stderr at most this late (sooner in a burst), whole lines in few writes.",
        json_schema_extra=_group("node"),
    )

    # --- PostgreSQL ---------------------------------------------------------------------------
    catalog_dsn: str = Field(
        min_length=1,
        description="libpq DSN of the catalog database's primary (products, inventory, "
        "images, the global user directory).",
        json_schema_extra=_group("postgres"),
    )
    catalog_replica_dsn: str | None = Field(
        None,
        description="libpq DSN of a catalog replica for reads; unset reads the primary.",
        json_schema_extra=_group("postgres"),
    )
    shards: list[ShardDsn] = Field(
        min_length=1,
        description='User shards as JSON: `[{"primary": DSN, "replica": DSN or null}, ...]`. '
        "A user lives on shard `user_id % len(shards)`.",
        json_schema_extra=_group("postgres"),
    )
    pool_min_size: int = Field(
        0,
        ge=0,
        le=100,
        description="Connections each pool opens eagerly (0: open on first use, so a node "
        "starts while a database is down and reports it on /readyz).",
        json_schema_extra=_group("postgres"),
    )
    pool_max_size: int = Field(
        10,
        ge=1,
        le=500,
        description="Most connections in each pool.",
        json_schema_extra=_group("postgres"),
    )
    pool_acquire_timeout_s: float = Field(
        5.0,
        gt=0,
        le=120,
        description="Longest wait for a pooled connection.",
        json_schema_extra=_group("postgres"),
    )
    connect_timeout_s: int = Field(
        3,
        ge=1,
        le=60,
        description="libpq connect_timeout for new connections.",
        json_schema_extra=_group("postgres"),
    )
    statement_timeout_ms: int = Field(
        5000,
        ge=0,
        le=600_000,
        description="Server-side statement_timeout for every connection (0: none).",
        json_schema_extra=_group("postgres"),
    )

    # --- Redis --------------------------------------------------------------------------------
    redis_url: str = Field(
        min_length=1,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis (or Valkey) URL for the broker, caches, sessions and rate limits.",
        json_schema_extra=_group("redis"),
    )
    redis_cluster: bool = Field(
        False,
        description=(
            "`redis_url` names a node of a Redis Cluster (Redis 7+ or Valkey): every script "
            "keeps to one hash slot, and streams use sharded pub/sub (SPUBLISH/SSUBSCRIBE)."
        ),
        json_schema_extra=_group("redis"),
    )
    redis_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Socket and connect timeout for Redis commands.",
        json_schema_extra=_group("redis"),
    )

    redis_max_connections: int = Field(
        64,
        ge=2,
        le=10_000,
        description="Most Redis connections a node opens; commands beyond wait for one.",
        json_schema_extra=_group("redis"),
    )

    # --- lifecycle ------------------------------------------------------------------------------
    readiness_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Time /readyz gives each dependency to answer.",
        json_schema_extra=_group("lifecycle"),
    )
    drain_delay_s: float = Field(
        1.0,
        ge=0,
        le=300,
        description="After SIGTERM, how long the node keeps serving with /readyz at 503 so "
        "the load balancer stops sending new work before the listener closes.",
        json_schema_extra=_group("lifecycle"),
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="After the listener closes, longest wait for requests in flight.",
        json_schema_extra=_group("lifecycle"),
    )

    # --- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest request body accepted by JSON endpoints (413 beyond it).",
        json_schema_extra=_group("limits"),
    )
    ratelimit_ip_per_second: float = Field(
        50.0,
        gt=0,
        description="Sustained requests per second per client address, REST and GraphQL "
        "alike (GCRA in Redis, shared by all nodes; GraphQL query cost has its own bucket, "
        "`FM_GRAPHQL_THROTTLE_*`).",
        json_schema_extra=_group("limits"),
    )
    ratelimit_ip_burst: int = Field(
        200,
        ge=1,
        description="Units a client address may spend at once before the rate applies "
        "(429 with `Retry-After` beyond).",
        json_schema_extra=_group("limits"),
    )
    ratelimit_user_per_second: float = Field(
        20.0,
        gt=0,
        description="Sustained requests per second per signed-in user (REST and GraphQL).",
        json_schema_extra=_group("limits"),
    )
    ratelimit_user_burst: int = Field(
        100,
        ge=1,
        description="Units a signed-in user may spend at once before the rate applies.",
        json_schema_extra=_group("limits"),
    )

    # --- cache ----------------------------------------------------------------------------------
    cache_local_max_entries: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="Entries of the per-node in-memory cache in front of Redis (0: none).",
        json_schema_extra=_group("cache"),
    )
    cache_local_max_staleness_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Longest an in-memory cache entry is served after it was read from Redis "
        "(bounds staleness when an invalidation message is lost).",
        json_schema_extra=_group("cache"),
    )
    checkout_sweep_period_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How often each node's sweeper looks for checkouts left between steps by a "
        "crash (it releases their reservations, or confirms those with an order).",
        json_schema_extra=_group("commerce"),
    )
    checkout_stale_after_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Age after which the sweeper treats a checkout still between steps as "
        "abandoned; keep it well above the longest checkout (statement timeouts included).",
        json_schema_extra=_group("commerce"),
    )

    # --- realtime -------------------------------------------------------------------------------
    benchmark_channel: bool = Field(
        False,
        description="Enable `BenchmarkChannel` and `BenchmarkHistoryChannel` on /cable "
        "(load tools only).",
        json_schema_extra=_group("realtime"),
    )
    cable_allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins (besides the node's own host) allowed to open /cable, "
        'as JSON, e.g. `["https://shop.example"]`.',
        json_schema_extra=_group("realtime"),
    )
    cable_max_frame_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest inbound WebSocket message; bigger ones close the connection (1009).",
        json_schema_extra=_group("realtime"),
    )
    cable_max_subscriptions: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Subscriptions one connection may hold; more are rejected.",
        json_schema_extra=_group("realtime"),
    )
    cable_commands_per_second: float = Field(
        50.0,
        gt=0,
        description="Sustained commands per second per connection (token bucket).",
        json_schema_extra=_group("realtime"),
    )
    cable_command_burst: int = Field(
        100,
        ge=1,
        description="Commands a connection may send at once before the rate applies; a "
        "connection that exceeds the bucket is disconnected.",
        json_schema_extra=_group("realtime"),
    )
    cable_slow_consumer_bytes: int = Field(
        1024 * 1024,
        ge=4096,
        description="Unsent bytes past which a connection is a slow consumer: cut off if it "
        "stays above this for the grace period, or above 4 times this once its backlog has not "
        "shrunk for a second (it recovers on reconnect).",
        json_schema_extra=_group("realtime"),
    )
    cable_slow_consumer_grace_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How long a connection may stay above the slow-consumer bound.",
        json_schema_extra=_group("realtime"),
    )
    cable_max_connections_per_ip: int = Field(
        2000,
        ge=1,
        description="Concurrent /cable connections from one client address (429 beyond).",
        json_schema_extra=_group("realtime"),
    )
    cable_ping_interval_s: float = Field(
        3.0,
        gt=0,
        le=60,
        description="Ping period; the Action Cable client reconnects after 6 s without one.",
        json_schema_extra=_group("realtime"),
    )
    presence_ttl_s: float = Field(
        15.0,
        ge=3,
        le=300,
        description=(
            "How long a node's viewer counts stay in the presence totals without a refresh "
            "(refreshed every third of it), so a node that dies stops counting within about "
            "4/3 of it."
        ),
        json_schema_extra=_group("realtime"),
    )
    cable_history_limit: int = Field(
        100,
        ge=0,
        le=100_000,
        description="Messages kept per stream for recovery (AnyCable's `history_limit`; the "
        "extended protocol's `history` and the `since` param); 0 keeps none.",
        json_schema_extra=_group("realtime"),
    )
    cable_history_ttl_s: int = Field(
        300,
        ge=0,
        le=7 * 86400,
        description="A stream's history expires this long after its last message (as "
        "AnyCable's `history_ttl`, the whole history at once); 0 never.",
        json_schema_extra=_group("realtime"),
    )
    cable_session_ttl_s: int = Field(
        300,
        ge=0,
        le=86400,
        description="How long an extended-protocol connection's session (its user and "
        "subscriptions) stays restorable after it goes, by `?sid=` or `X-AnyCable-Restore-SID`"
        " on any node; 0 keeps none.",
        json_schema_extra=_group("realtime"),
    )
    cable_pong_timeout_s: float = Field(
        6.0,
        ge=0,
        le=300,
        description="An extended-protocol client that has sent a `pong` and then is silent "
        'this long is sent `disconnect {reason: "no_pong", reconnect: true}` and closed; 0 '
        "never.",
        json_schema_extra=_group("realtime"),
    )

    # --- graphql --------------------------------------------------------------------------------
    graphql_max_cost: int = Field(
        1000,
        ge=1,
        description="Most a GraphQL operation may cost (objects 1, connections `first` times "
        "their items, mutations 10); dearer ones are refused before they run "
        "(`MAX_COST_EXCEEDED`, with the cost).",
        json_schema_extra=_group("graphql"),
    )
    graphql_max_depth: int = Field(
        15,
        ge=1,
        le=100,
        description="Most nested fields a GraphQL operation may have (`MAX_DEPTH_EXCEEDED`).",
        json_schema_extra=_group("graphql"),
    )
    graphql_max_document_bytes: int = Field(
        32 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest GraphQL document (query text) accepted, over HTTP and WebSocket.",
        json_schema_extra=_group("graphql"),
    )
    graphql_throttle_maximum: int = Field(
        1000,
        ge=1,
        description="Cost units a caller's GraphQL bucket holds (`maximumAvailable`; per user, "
        "or per address when anonymous); an operation costing more than is left answers "
        "429 `THROTTLED` with `Retry-After`.",
        json_schema_extra=_group("graphql"),
    )
    graphql_throttle_restore_per_second: float = Field(
        50.0,
        gt=0,
        description="Cost units a GraphQL bucket regains per second (`restoreRate`).",
        json_schema_extra=_group("graphql"),
    )
    graphql_result_cache_ttl_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Lifetime of cached results of public GraphQL queries (no `me`, `cart`, "
        "`orders`, mutations) in Redis; catalog writes invalidate them sooner, and results "
        "showing stock live at most a second. 0: no result cache.",
        json_schema_extra=_group("graphql"),
    )
    graphql_persisted_query_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="How long an automatic persisted query stays registered after its last "
        "registration.",
        json_schema_extra=_group("graphql"),
    )
    graphql_ws_max_subscriptions: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Operations one GraphQL WebSocket may run at once; more are refused with "
        "an error for that operation.",
        json_schema_extra=_group("graphql"),
    )
    graphql_ws_init_timeout_s: float = Field(
        3.0,
        gt=0,
        le=300,
        description="Time a GraphQL WebSocket has to send `connection_init` (then closed with "
        "4408).",
        json_schema_extra=_group("graphql"),
    )
    graphql_ws_max_message_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest inbound GraphQL WebSocket message; bigger ones close the "
        "connection (1009).",
        json_schema_extra=_group("graphql"),
    )
    graphql_ws_messages_per_second: float = Field(
        20.0,
        gt=0,
        description="Sustained messages per second a GraphQL WebSocket may send (token bucket).",
        json_schema_extra=_group("graphql"),
    )
    graphql_ws_message_burst: int = Field(
        50,
        ge=1,
        description="Messages a GraphQL WebSocket may send at once before the rate applies; "
        "one that exceeds the bucket is closed (4429).",
        json_schema_extra=_group("graphql"),
    )

    # --- images ---------------------------------------------------------------------------------
    image_max_upload_bytes: int = Field(
        25 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest image upload; the body is refused (413) as soon as it passes this, "
        "while it streams in.",
        json_schema_extra=_group("images"),
    )
    image_max_pixels: int = Field(
        50_000_000,
        ge=1,
        le=1_000_000_000,
        description="Most pixels (width x height, read from the header before decoding) an "
        "upload may have; progressive JPEGs, interlaced PNGs and other formats decoded whole "
        "get half of it (they need the whole image in memory).",
        json_schema_extra=_group("images"),
    )
    image_storage: Literal["local"] = Field(
        "local",
        description="Where image variants are stored: `local` (a directory, "
        "`FM_IMAGE_STORAGE_DIR`).",
        json_schema_extra=_group("images"),
    )
    image_storage_dir: str = Field(
        ".fm-data/images",
        min_length=1,
        description="Directory of the `local` image storage (relative paths: from the working "
        "directory).",
        json_schema_extra=_group("images"),
    )
    image_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Uploads rendered at once, in the node's image worker process (a child "
        "process at a low CPU priority; each upload's encodes use two threads).",
        json_schema_extra=_group("images"),
    )
    image_queue_limit: int = Field(
        16,
        ge=0,
        le=1000,
        description="Uploads accepted beyond those being rendered; further uploads get 503 "
        "with `Retry-After` before their body is read.",
        json_schema_extra=_group("images"),
    )
    image_worker_priority: Literal["low", "normal"] = Field(
        "low",
        description="CPU priority of the image worker process: `low` (its own autogroup at "
        "nice 19: renders take the CPU the node and its neighbours leave, so broadcasts keep "
        "their latency) or `normal` (the node's: uploads compete for the cores, e.g. on a "
        "node that only takes uploads, or a benchmark of the pipeline on a shared machine).",
        json_schema_extra=_group("images"),
    )

    # --- storefront -----------------------------------------------------------------------------
    static_dir: str = Field(
        "static/dist",
        min_length=1,
        description="Directory of the built storefront assets (`scripts/build-assets` writes "
        "`static/dist`; relative paths: from the project root). Read once at start-up; without "
        "its `manifest.json` the API still serves, but pages and assets answer 500 saying to "
        "run `scripts/build-assets`.",
        json_schema_extra=_group("storefront"),
    )
    html_s_maxage_s: int = Field(
        30,
        ge=0,
        le=86400,
        description="`s-maxage` of the cacheable storefront pages (`/`, `/products/{id}`, "
        "`/offline`): how long a shared cache may serve them, and so how old their stock "
        "count may be (browsers always revalidate: `max-age=0`).",
        json_schema_extra=_group("storefront"),
    )
    html_stale_while_revalidate_s: int = Field(
        60,
        ge=0,
        le=86400,
        description="`stale-while-revalidate` of the cacheable pages.",
        json_schema_extra=_group("storefront"),
    )
    html_stale_if_error_s: int = Field(
        86400,
        ge=0,
        le=30 * 86400,
        description="`stale-if-error` of the cacheable pages: how long an edge may keep "
        "serving them while the nodes fail.",
        json_schema_extra=_group("storefront"),
    )
    fragment_ttl_s: float = Field(
        3600.0,
        gt=0,
        le=86400,
        description="Redis lifetime of a rendered product card or product body (HTML "
        "fragments, keyed by the product's cached version, so edits never wait for it).",
        json_schema_extra=_group("storefront"),
    )
    compress_min_bytes: int = Field(
        1024,
        ge=0,
        description="Smallest dynamic text response (HTML, JSON, problems) compressed with "
        "Brotli or gzip, by `Accept-Encoding`; smaller ones go as they are.",
        json_schema_extra=_group("storefront"),
    )
    compress_brotli_quality: int = Field(
        5,
        ge=0,
        le=11,
        description="Brotli quality of dynamic responses (5: ~190 µs for a 45 KiB list page, "
        "within 15% of quality 11's size at 1/250 of its time; measurements in "
        "server/compression.py). Cached bodies are compressed once, whatever the quality.",
        json_schema_extra=_group("storefront"),
    )
    compress_gzip_level: int = Field(
        6,
        ge=1,
        le=9,
        description="gzip level of dynamic responses (for clients without Brotli).",
        json_schema_extra=_group("storefront"),
    )
    compress_cache_entries: int = Field(
        2048,
        ge=0,
        le=1_000_000,
        description="Compressed bodies of cached responses (named by their strong ETag) kept "
        "per node, so a hot cached read is compressed once, not per request (0: none kept).",
        json_schema_extra=_group("storefront"),
    )
    edge_purge: Literal["log", "nginx"] = Field(
        "log",
        description="What catalog writes tell the edge cache: `log` (a structured "
        "`edge_purge` line with the surrogate keys) or `nginx` (the pages of those keys purged "
        "from the nginx of `config/nginx.conf` through `FM_EDGE_PURGE_URL`).",
        json_schema_extra=_group("storefront"),
    )
    edge_purge_url: str | None = Field(
        None,
        description="The edge's purge location for `FM_EDGE_PURGE=nginx`, e.g. "
        "`http://127.0.0.1:8080/_edge/purge` (reachable from the nodes only).",
        json_schema_extra=_group("storefront"),
    )
    edge_purge_queue_limit: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Surrogate keys waiting for the background purger; beyond it a write's "
        "keys are dropped (logged and counted; its pages then expire by `s-maxage`).",
        json_schema_extra=_group("storefront"),
    )
    edge_purge_interval_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="Rest between two purge batches: keys changed meanwhile go out together, "
        "so a page that changes many times a second (every checkout changes a product's "
        "count) is purged at most once per interval and stays cached between; a write reaches "
        "the edge within this plus one purge round trip.",
        json_schema_extra=_group("storefront"),
    )
    cart_idempotency_ttl_s: int = Field(
        86400,
        ge=60,
        le=7 * 86400,
        description="How long a cart change's `Idempotency-Key` and its answer are kept "
        "(in Redis, and in the shard until the checkout sweeper removes it), so an offline "
        "replay within it applies once.",
        json_schema_extra=_group("storefront"),
    )

    @field_validator("secret_key")
    @classmethod
    def _secret_key_long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < MIN_SECRET_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_KEY_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _purge_url_for_nginx(self) -> Settings:
        if self.edge_purge == "nginx" and not self.edge_purge_url:
            raise ValueError("FM_EDGE_PURGE=nginx needs FM_EDGE_PURGE_URL, the edge's purge URL")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then config files, then field defaults."""
        files = config_files(os.environ)
        toml = TomlConfigSettingsSource(settings_cls, toml_file=files, deep_merge=True)
        return (init_settings, env_settings, toml)


def configure_logging_for(settings: Settings) -> None:
    """Set up the process's logs as `settings` say (level, format, node id, the buffer)."""
    configure_logging(
        settings.log_level,
        settings.log_format,
        settings.node_id,
        buffer_lines=settings.log_buffer_lines,
        flush_interval_s=settings.log_flush_interval_s,
    )


def config_files(environ: Mapping[str, str]) -> list[Path]:
    """The TOML files a node reads, lowest precedence first; missing files are skipped."""
    config_dir = Path(environ.get("FM_CONFIG_DIR", DEFAULT_CONFIG_DIR))
    files = [config_dir / "finalmarket.toml", config_dir / "local.toml"]
    if extra := environ.get("FM_CONFIG"):
        files.append(Path(extra))
    return files


class SettingsInvalid(Exception):
    """Start-up refused: a setting is missing or malformed. `str()` is one line per problem;
    `missing` names (as `FM_*` variables) the required settings that no source gave."""

    def __init__(self, message: str, missing: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.missing = missing


def load_settings(**overrides: Any) -> Settings:
    """Build the node's settings; raise `SettingsInvalid` naming each bad setting."""
    extra = os.environ.get("FM_CONFIG")
    if extra and not Path(extra).is_file():
        raise SettingsInvalid(f"FM_CONFIG: no such file {extra!r}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsInvalid(_describe_validation(exc), _missing(exc)) from None
    except SettingsError as exc:
        raise SettingsInvalid(_describe_settings_error(exc)) from None


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _missing(exc: ValidationError) -> frozenset[str]:
    return frozenset(
        _env_name(str(error["loc"][0]))
        for error in exc.errors()
        if error["type"] == "missing" and len(error["loc"]) == 1
    )


def _describe_validation(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = _env_name(loc[0]) if loc else "settings"
        where = "".join(f"[{part}]" for part in loc[1:])
        if error["type"] == "missing":
            lines.append(f"{name}{where}: required setting is missing")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{name}{where}: unknown setting (check the spelling)")
        else:
            shown = "" if "secret" in loc[0] else f" (got {error.get('input')!r})"
            lines.append(f"{name}{where}: {error['msg']}{shown}")
    return "\n".join(lines)


def _describe_settings_error(exc: SettingsError) -> str:
    # pydantic-settings phrases these as: error parsing value for field "shards" from source ...
    text = str(exc)
    for field in Settings.model_fields:
        if f'"{field}"' in text:
            return f"{_env_name(field)}: malformed value (expected JSON for this setting)"
    return f"settings: {text}"


def settings_table_markdown() -> str:
    """The README's configuration table, one row per setting, grouped."""
    rows = ["| variable | group | default | description |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = "(computed)"
        else:
            default = f"`{field.default!r}`" if field.default is not None else "unset"
        description = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{_env_name(name)}` | {extra.get('group', '')} | {default} | {description} |"
        )
    return "\n".join(rows)
