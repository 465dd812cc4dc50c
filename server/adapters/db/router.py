"""Routing of reads and writes to the right database server: shard, then primary or replica.

The domain services ask this router for a cursor instead of picking pools themselves:

* ``async with router.write(user_id) as cur:`` is a transaction on the user's shard primary
  (``BEGIN READ WRITE`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises; aiopg connections
  are in autocommit mode, so the router issues these explicitly). Reads that must see the
  transaction's own changes run on this same cursor.
* ``async with router.read(user_id) as cur:`` reads from the shard's streaming replica when that
  is safe, else from the primary. It is not safe when the user wrote within
  ``read_your_writes_s`` (read-your-writes, as Rails' 2-second delay), when the replica is
  unreachable (it is then skipped for ``replica_backoff_s``), or when it lags by more than
  ``max_replica_lag_s`` (measured at most once per ``lag_check_interval_s`` per replica).
  Read blocks run in autocommit mode, so each statement stands alone and re-running one is
  harmless: a statement that fails on a connection error is run again, once per block, on the
  primary.
* ``catalog_write(actor)`` / ``catalog_read(actor)`` do the same for the catalog database;
  ``actor`` (usually the user id of an admin) is who gets read-your-writes.

Failover. Primary DSNs may name several hosts with ``target_session_attrs=read-write`` so a
promoted replica is followed. aiopg cannot open such connections when the first host is down or
read-only: libpq moves to the next host on a new socket while aiopg keeps waiting on the old
file descriptor, so the connect hangs until the pool's timeout. The router therefore lets libpq
pick the read-write host once, in a worker thread with a blocking connect, and points the
role's primary pool at that single host (swapping ``RolePools.primary`` for a new pool). It does
this on first use of a primary and again after any connection error on it; a failed BEGIN is
retried once on the new pool, and a standby answers ``BEGIN READ WRITE`` with an error, so a
write never runs on a server that has become read-only. Replica DSNs may likewise name several
hosts with ``target_session_attrs=prefer-standby``: the replica pool is pointed at the host
libpq picks, again after a connection error on it and when its lag check finds that host
leading (a failover promoted it). While none of its hosts is a standby, the replica counts
as down (looked for again every ``replica_backoff_s``) and reads use the primary pool.
Connections that failed are closed
before they go back to their pool, and the idle connections of a pool that failed are dropped,
so work resumes without a restart.

A statement the server cancels (``statement_timeout``) reaches callers as psycopg2's
``QueryCanceled``, an ``OperationalError`` (503 at the API), not as the bare
``asyncio.CancelledError`` aiopg makes of it.

Nothing here uses session state (no SET, no prepared statements, no temp tables): every
transaction and every read stands alone, so the router works behind PgBouncer in transaction
mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiopg
import psycopg2
import psycopg2.extensions

from server.adapters.db.dsn import DatabaseSettings
from server.adapters.db.pools import Database, PoolOptions, RolePools, open_pool, shard_index

Clock = Callable[[], float]

# How far behind the primary a standby is, in seconds. An idle primary sends no new
# transactions, so `pg_last_xact_replay_timestamp()` ages without any lag: a standby that has
# replayed everything it received counts as not lagging. A promoted standby is a primary.
LAG_SQL = """
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
    ELSE COALESCE(
        EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8,
        'Infinity'::float8)
END::float8, pg_is_in_recovery()
"""

# OperationalErrors about the statement (statement_timeout; serialization failure, deadlock).
_STATEMENT_ERRORS = (
    psycopg2.extensions.QueryCanceledError | psycopg2.extensions.TransactionRollbackError
)
# SQLSTATEs after which the server (not the statement) is the problem.
_SERVER_GONE_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, starting up
# SQLSTATEs meaning "this server is read-only now": it was demoted to a standby.
# (A standby refuses `BEGIN READ WRITE` with 0A000 and a write with 25006.)
_READ_ONLY_STATES = frozenset({"25006", "0A000"})


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` says the connection or server failed, not the statement.

    psycopg2 raises `OperationalError` for lost connections but also for statement-level
    problems (`QueryCanceled` from statement_timeout, serialization failures, deadlocks), which
    carry a SQLSTATE; those are not connection errors and are never retried here. Neither is
    a timeout (`TimeoutError`, an `OSError`): waiting for a busy pool is not a broken server,
    and retrying would only double the wait.
    """
    if isinstance(exc, TimeoutError | _STATEMENT_ERRORS):
        return False
    if isinstance(exc, psycopg2.InterfaceError | OSError):
        return True
    if isinstance(exc, psycopg2.OperationalError):
        code = exc.pgcode
        return code is None or code.startswith("08") or code in _SERVER_GONE_STATES
    return False


def _statement_cancelled(exc: BaseException) -> psycopg2.extensions.QueryCanceledError | None:
    """The server's QueryCanceled (e.g. statement_timeout) hidden in `exc`, if that is all it is.

    aiopg 1.4 turns a QueryCanceled answer into a bare `asyncio.CancelledError` (its
    `__context__` is the original), which `except Exception` blocks (saga compensation, the
    sweeper loop, handlers' 503 mapping) do not catch. Returns the original unless the current
    task is really being cancelled.
    """
    if not isinstance(exc, asyncio.CancelledError):
        return None
    original = exc.__context__
    if not isinstance(original, psycopg2.extensions.QueryCanceledError):
        return None
    task = asyncio.current_task()
    return None if task is not None and task.cancelling() else original


async def _execute(cur: aiopg.Cursor, sql: str, params: Any = None) -> None:
    """`cur.execute`, raising a timed-out statement as QueryCanceled (see above)."""
    try:
        await cur.execute(sql, params)
    except asyncio.CancelledError as exc:
        original = _statement_cancelled(exc)
        if original is None:
            raise
        raise original from None


def _is_read_only_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg2.Error) and exc.pgcode in _READ_ONLY_STATES


def _is_recovery_conflict(exc: BaseException) -> bool:
    """A standby cancelled the statement because replayed WAL conflicted with it (40001)."""
    return isinstance(exc, psycopg2.Error) and exc.pgcode == "40001"


class PrimaryUnavailable(psycopg2.OperationalError):
    """No server of a database's primary DSN accepts writes right now (e.g. mid-failover).

    A subclass of `psycopg2.OperationalError`, so callers that handle lost connections handle
    this too (typically as 503).
    """


@dataclass(slots=True)
class RouterCounters:
    """What the router did for one database; plain ints for /metrics to export.

    A read block counts once, as `replica_reads` or `primary_reads`, by where it finished.
    The reason counters say why a read that could have used a replica did not.
    """

    replica_reads: int = 0  # read blocks served by the replica
    primary_reads: int = 0  # read blocks served by the primary (any reason)
    read_your_writes: int = 0  # ... because the caller wrote within read_your_writes_s
    lag_fallbacks: int = 0  # ... because the replica lagged past max_replica_lag_s
    replica_fallbacks: int = 0  # ... because the replica failed or is in its backoff
    replica_errors: int = 0  # connection errors seen on the replica (each starts a backoff)
    read_retries: int = 0  # read statements re-run on the primary after a connection error
    read_statements: int = 0  # statements run in read blocks (the N+1 tests count these)
    writes: int = 0  # transactions begun
    write_retries: int = 0  # BEGINs retried on a fresh primary connection
    primary_errors: int = 0  # connection errors seen on the primary
    primary_relocations: int = 0  # primary pool re-pointed at the host libpq chose
    replica_relocations: int = 0  # replica pool re-pointed at the standby libpq chose

    def add(self, other: RouterCounters) -> None:
        """Add `other`'s counts into these."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dataclasses.asdict(self)


class RecentWrites:
    """When each key last wrote, for read-your-writes; bounded in age and in size.

    Entries are kept in time order (an update moves the key to the end), so expired entries
    are always at the front and pruning is O(1) amortised. Entries older than `window_s` are
    useless and dropped; beyond `max_entries` the oldest are dropped too (their owners then
    read a replica up to `window_s` early: only under > max_entries writers per window).
    """

    def __init__(
        self, window_s: float, max_entries: int = 100_000, clock: Clock = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._at: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._at)

    def note(self, key: Hashable) -> None:
        """Record that `key` wrote now."""
        if self.window_s <= 0:
            return
        now = self._clock()
        self._at[key] = now
        self._at.move_to_end(key)
        self._prune(now)

    def wrote_recently(self, key: Hashable) -> bool:
        """Whether `key` wrote less than `window_s` ago."""
        at = self._at.get(key)
        if at is None:
            return False
        now = self._clock()
        if now - at < self.window_s:
            return True
        self._prune(now)
        return False

    def _prune(self, now: float) -> None:
        entries = self._at
        while entries:
            oldest_at = entries[next(iter(entries))]
            if len(entries) <= self.max_entries and now - oldest_at < self.window_s:
                return
            entries.popitem(last=False)


@dataclass(slots=True)
class _ReplicaState:
    """Health of one replica as the router last saw it, and, for a multi-host replica DSN
    (``target_session_attrs=prefer-standby``), which host its pool points at."""

    down_until: float = float("-inf")
    clear_pool: bool = False  # drop its idle connections before the next use
    lag_s: float = 0.0
    lag_checked_at: float = float("-inf")
    dsn: str = ""
    multi_host: bool = False
    stale: bool = False  # locate the standby before the next use (multi-host only)
    target: tuple[str, int] | None = None
    located_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class _PrimaryState:
    """Where one primary is: `dsn` is the configured (possibly multi-host) DSN."""

    dsn: str
    multi_host: bool
    stale: bool  # locate / clean the pool before the next use
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    target: tuple[str, int] | None = None  # host the current pool points at (multi-host only)
    failed_at: float | None = None
    last_error: str = ""


def _is_multi_host(dsn: str) -> bool:
    params = psycopg2.extensions.parse_dsn(dsn)
    return "," in params.get("host", "") or "," in params.get("hostaddr", "")


def _single_host_dsn(dsn: str, host: str, port: int) -> str:
    """`dsn` with its host list replaced by the one host libpq chose (other options kept)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.pop("hostaddr", None)
    params.update(host=host, port=str(port))
    return str(psycopg2.extensions.make_dsn(**params))


def _locate_host(dsn: str, connect_timeout_s: int) -> tuple[str, int]:
    """The (host, port) libpq connects to for `dsn`; blocking, run in a worker thread.

    libpq's own multi-host logic (with `target_session_attrs`: `read-write` for a primary,
    `prefer-standby` for a replica) decides, synchronously, where aiopg's asynchronous
    connect cannot follow it.
    """
    conn = psycopg2.connect(dsn, connect_timeout=connect_timeout_s)
    try:
        return str(conn.info.host), int(conn.info.port)
    finally:
        conn.close()


class NoStandby(psycopg2.OperationalError):
    """A multi-host replica DSN reaches no standby now (libpq's `prefer-standby` fell back to
    the primary): the replica is down, and reads use the primary pool meanwhile."""


def _locate_standby(dsn: str, connect_timeout_s: int) -> tuple[str, int]:
    """The standby (host, port) libpq picks for a `prefer-standby` DSN; blocking, run in a
    worker thread. Raises `NoStandby` when the host it picks is not in recovery."""
    conn = psycopg2.connect(dsn, connect_timeout=connect_timeout_s)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            row = cur.fetchone()
        if not (row and row[0]):
            raise NoStandby(
                f"no standby among the hosts of the replica DSN (got {conn.info.host}"
                f":{conn.info.port}, a primary)"
            )
        return str(conn.info.host), int(conn.info.port)
    finally:
        conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ReadCursor:
    """The cursor of a routed read block (replica or primary, decided by the router).

    Offers the read side of an aiopg cursor. A statement that fails on a connection error is
    run again, once per block, on a fresh primary connection: reads run in autocommit mode,
    so each statement stands alone and re-running it is harmless.
    """

    def __init__(self, router: ShardRouter, role: RolePools) -> None:
        self._router = router
        self._role = role
        self._pool: aiopg.Pool | None = None
        self._conn: aiopg.Connection | None = None
        self._cur: aiopg.Cursor | None = None
        self._retried = False
        self.on_replica = False

    # -- the cursor API ----------------------------------------------------------------------

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Run one statement; after a connection error (or a standby's recovery conflict),
        once per block, again on the primary."""
        counters = self._router._counters(self._role)
        counters.read_statements += 1
        try:
            await _execute(self._cursor(), sql, params)
            return
        except Exception as exc:
            was_replica = self.on_replica
            if is_connection_error(exc):
                await self._discard(exc)
            elif was_replica and _is_recovery_conflict(exc):
                await self._release()  # the connection is fine; this statement was not
            else:
                raise
            if self._retried:
                raise
            if was_replica:
                counters.replica_fallbacks += 1
        self._retried = True
        counters.read_retries += 1
        await self._open_primary(retry=False)
        try:
            await _execute(self._cursor(), sql, params)
        except Exception as exc:
            if is_connection_error(exc):
                await self._discard(exc)
            raise

    async def fetchone(self) -> Any:
        """The next row, or None."""
        return await self._cursor().fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """Up to `size` more rows."""
        return await self._cursor().fetchmany(size)

    async def fetchall(self) -> list[Any]:
        """The remaining rows."""
        return await self._cursor().fetchall()

    @property
    def description(self) -> Sequence[Any] | None:
        """Column descriptions of the last result (DB-API)."""
        return self._cursor().description

    @property
    def rowcount(self) -> int:
        """Rows of the last result (DB-API)."""
        return self._cursor().rowcount

    # -- routing -----------------------------------------------------------------------------

    def _cursor(self) -> aiopg.Cursor:
        if self._cur is None:
            raise psycopg2.InterfaceError("the read's connection was lost and not replaced")
        return self._cur

    async def _open(self, try_replica: bool) -> None:
        if try_replica and await self._open_replica():
            return
        await self._open_primary(retry=True)

    async def _open_replica(self) -> bool:
        """Take a replica connection; False (and counted) when the replica will not do."""
        router, role = self._router, self._role
        state = router._replica_state(role)
        counters = router._counters(role)
        self.on_replica = True  # a failure from here on is the replica's
        try:
            pool = await router._replica_pool(role)
            if state.clear_pool:
                state.clear_pool = False
                await pool.clear()
            conn = await pool.acquire()
            self._attach(pool, conn, await conn.cursor(), on_replica=True)
            now = router._clock()
            if now - state.lag_checked_at >= router.lag_check_interval_s:
                state.lag_checked_at = now  # claimed: concurrent reads use the cached value
                await self._cursor().execute(LAG_SQL)
                row = await self._cursor().fetchone()
                state.lag_s = float(row[0]) if row and row[0] is not None else float("inf")
                if row is not None and row[1] is False:
                    router._replica_is_primary(role)
        except Exception as exc:  # unreachable, or failed its lag check: use the primary
            await self._discard(exc)
            counters.replica_fallbacks += 1
            return False
        if state.lag_s > router.max_replica_lag_s:
            counters.lag_fallbacks += 1
            await self._release()
            return False
        return True

    async def _open_primary(self, *, retry: bool) -> None:
        router, role = self._router, self._role
        for attempt in range(2 if retry else 1):
            pool = await router._primary_pool(role)
            try:
                conn = await pool.acquire()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                router._primary_failed(role, exc)
                if attempt or not retry:
                    raise
                router._counters(role).read_retries += 1
                self._retried = True
                continue
            try:
                cur = await conn.cursor()
            except BaseException:
                conn.close()
                await pool.release(conn)
                raise
            self._attach(pool, conn, cur, on_replica=False)
            return

    def _attach(
        self, pool: aiopg.Pool, conn: aiopg.Connection, cur: aiopg.Cursor, *, on_replica: bool
    ) -> None:
        self._pool, self._conn, self._cur, self.on_replica = pool, conn, cur, on_replica

    async def _release(self) -> None:
        """Give the connection back (closed first if it is broken or mid-transaction)."""
        pool, conn, cur = self._pool, self._conn, self._cur
        self._pool = self._conn = self._cur = None
        if pool is None or conn is None:
            return
        if cur is not None:
            cur.close()
        if not conn.closed and conn.raw.get_transaction_status() != (
            psycopg2.extensions.TRANSACTION_STATUS_IDLE
        ):
            conn.close()  # the block left a transaction open: never hand that to others
        await pool.release(conn)

    async def _discard(self, exc: BaseException) -> None:
        """Close the failed connection, release it, and tell the router which server failed."""
        if self._conn is not None:
            self._conn.close()
        was_replica = self.on_replica
        await self._release()
        if was_replica:
            self._router._replica_failed(self._role)
        else:
            self._router._primary_failed(self._role, exc)

    async def _finish(self) -> None:
        counters = self._router._counters(self._role)
        if self.on_replica:
            counters.replica_reads += 1
        else:
            counters.primary_reads += 1
        await self._release()


class ShardRouter:
    """Picks the database server for each read and write of the domain services.

    Wraps a `Database` (whose pools it uses, and whose primary pools it re-points after a
    failover). `primary_dsns` maps database names ("catalog", "shard_0", ...) to their
    configured primary DSNs; a multi-host one is followed through failovers (a database
    without an entry keeps its pool, which is only cleaned after errors). `pool_options` is
    how re-pointed pools are opened; `clock` is monotonic seconds (injectable for tests).
    `for_settings` fills both from the node's settings.
    """

    def __init__(
        self,
        db: Database,
        *,
        read_your_writes_s: float = 2.0,
        max_replica_lag_s: float = 5.0,
        lag_check_interval_s: float = 1.0,
        replica_backoff_s: float = 2.0,
        primary_retry_backoff_s: float = 0.5,
        max_tracked_writers: int = 100_000,
        primary_dsns: Mapping[str, str] | None = None,
        replica_dsns: Mapping[str, str] | None = None,
        pool_options: PoolOptions | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.db = db
        self.read_your_writes_s = read_your_writes_s
        self.max_replica_lag_s = max_replica_lag_s
        self.lag_check_interval_s = lag_check_interval_s
        self.replica_backoff_s = replica_backoff_s
        self.primary_retry_backoff_s = primary_retry_backoff_s
        self.pool_options = pool_options or PoolOptions()
        self._clock = clock
        self.recent_writes = RecentWrites(read_your_writes_s, max_tracked_writers, clock)
        self.counters: dict[str, RouterCounters] = {}
        self._replicas: dict[str, _ReplicaState] = {}
        self._primaries: dict[str, _PrimaryState] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        for role in db.all_databases():
            self.counters[role.name] = RouterCounters()
            replica_dsn = (replica_dsns or {}).get(role.name, "")
            replica_multi = bool(replica_dsn) and _is_multi_host(replica_dsn)
            self._replicas[role.name] = _ReplicaState(
                dsn=replica_dsn, multi_host=replica_multi, stale=replica_multi
            )
            dsn = (primary_dsns or {}).get(role.name, "")
            multi = bool(dsn) and _is_multi_host(dsn)
            self._primaries[role.name] = _PrimaryState(dsn=dsn, multi_host=multi, stale=multi)

    @classmethod
    def for_settings(cls, db: Database, settings: DatabaseSettings, **options: Any) -> ShardRouter:
        """A router over `db` (opened from `settings`) that knows its configured primary DSNs
        and pool options; `options` are the other keyword arguments of the constructor."""
        dsns = {db.catalog.name: settings.catalog_dsn}
        dsns.update(
            {role.name: dsn.primary for role, dsn in zip(db.shards, settings.shards, strict=True)}
        )
        replica_dsns = {db.catalog.name: settings.catalog_replica_dsn or ""}
        replica_dsns.update(
            {
                role.name: dsn.replica or ""
                for role, dsn in zip(db.shards, settings.shards, strict=True)
            }
        )
        return cls(
            db,
            primary_dsns=dsns,
            replica_dsns=replica_dsns,
            pool_options=PoolOptions.from_settings(settings),
            **options,
        )

    # -- public API --------------------------------------------------------------------------

    def write(self, user_id: int) -> AbstractAsyncContextManager[aiopg.Cursor]:
        """A cursor in a transaction on `user_id`'s shard primary; commits when the block ends.

        The user's reads go to the primary for `read_your_writes_s` afterwards.
        """
        return self._transaction(self.db.shard_for(user_id), user_id)

    def catalog_write(self, actor: int | None = None) -> AbstractAsyncContextManager[aiopg.Cursor]:
        """A cursor in a transaction on the catalog primary; `actor` gets read-your-writes."""
        return self._transaction(self.db.catalog, actor)

    def read(self, user_id: int, *, fresh: bool = False) -> AbstractAsyncContextManager[ReadCursor]:
        """A read cursor for `user_id`'s shard: its replica when safe, else its primary.

        `fresh=True` always reads the primary (for reads that decide a write).
        """
        return self._read(self.db.shard_for(user_id), user_id, fresh)

    def catalog_read(
        self, actor: int | None = None, *, fresh: bool = False
    ) -> AbstractAsyncContextManager[ReadCursor]:
        """A read cursor on the catalog: its replica when safe for `actor`, else its primary."""
        return self._read(self.db.catalog, actor, fresh)

    async def ping_primary(self, role: RolePools) -> None:
        """Run `SELECT 1` on `role`'s primary (readiness), following a failover like writes do."""
        try:
            pool = await self._primary_pool(role)
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT 1")
                await cur.fetchone()
        except Exception as exc:
            self._primary_failed(role, exc)
            raise

    def shard_name(self, user_id: int) -> str:
        """Name of the database holding `user_id` (the key of `counters`)."""
        return self.db.shards[shard_index(user_id, len(self.db.shards))].name

    def totals(self) -> RouterCounters:
        """The counters of every database added up."""
        total = RouterCounters()
        for counters in self.counters.values():
            total.add(counters)
        return total

    async def close(self) -> None:
        """Wait for primary pools retired by failovers to close (the live pools belong to
        `Database`, closed by its own `close()`)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- reads -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _read(
        self, role: RolePools, key: int | None, fresh: bool
    ) -> AsyncIterator[ReadCursor]:
        cursor = ReadCursor(self, role)
        try:
            await cursor._open(not fresh and self._replica_allowed(role, key))
        except BaseException:
            await cursor._release()
            raise
        try:
            yield cursor
        finally:
            await cursor._finish()

    def _replica_allowed(self, role: RolePools, key: int | None) -> bool:
        """Whether a read may try the replica, counting the reason when it may not."""
        if role.replica is None:
            return False
        counters = self._counters(role)
        if key is not None and self.recent_writes.wrote_recently((role.name, key)):
            counters.read_your_writes += 1
            return False
        state = self._replicas[role.name]
        now = self._clock()
        if now < state.down_until:
            counters.replica_fallbacks += 1
            return False
        lag_known = now - state.lag_checked_at < self.lag_check_interval_s
        if lag_known and state.lag_s > self.max_replica_lag_s:
            counters.lag_fallbacks += 1
            return False
        return True

    def _replica_state(self, role: RolePools) -> _ReplicaState:
        return self._replicas[role.name]

    def _replica_failed(self, role: RolePools) -> None:
        state = self._replicas[role.name]
        state.down_until = self._clock() + self.replica_backoff_s
        state.clear_pool = True
        state.stale = state.multi_host
        self._counters(role).replica_errors += 1

    def _replica_is_primary(self, role: RolePools) -> None:
        """The replica pool reaches a primary (a failover promoted its standby): with a
        multi-host replica DSN, look for a standby again, at most once per backoff period
        (with no standby at all, libpq's `prefer-standby` keeps choosing the primary)."""
        state = self._replicas[role.name]
        if state.multi_host and self._clock() - state.located_at >= self.replica_backoff_s:
            state.stale = True

    async def _replica_pool(self, role: RolePools) -> aiopg.Pool:
        """The role's replica pool, first re-pointed at the standby libpq picks when its DSN
        names several hosts and a failure or a failover made it stale; `NoStandby` (the
        caller's fallback to the primary) when none of them is a standby now."""
        pool = role.replica
        assert pool is not None
        state = self._replicas[role.name]
        if not state.stale:
            return pool
        async with state.lock:
            if not state.stale:
                return role.replica or pool
            state.located_at = self._clock()
            loop = asyncio.get_running_loop()
            host, port = await loop.run_in_executor(
                None, _locate_standby, state.dsn, self.pool_options.connect_timeout_s
            )
            if (host, port) != state.target:
                new_pool = await open_pool(
                    _single_host_dsn(state.dsn, host, port), self.pool_options
                )
                old_pool, role.replica = role.replica, new_pool
                state.target = (host, port)
                state.clear_pool = False
                self._counters(role).replica_relocations += 1
                if old_pool is not None:
                    self._retire(old_pool)
            state.stale = False
        return role.replica or pool

    # -- writes ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, role: RolePools, key: int | None) -> AsyncIterator[aiopg.Cursor]:
        pool, conn, cur = await self._begin(role)
        try:
            try:
                yield cur
            except BaseException as exc:
                if is_connection_error(exc) or _is_read_only_error(exc):
                    self._primary_failed(role, exc)
                await self._end(role, pool, conn, cur, "ROLLBACK")
                original = _statement_cancelled(exc)
                if original is not None:
                    raise original from None
                raise
            await self._end(role, pool, conn, cur, "COMMIT")
        finally:
            if key is not None:
                self.recent_writes.note((role.name, key))

    async def _begin(self, role: RolePools) -> tuple[aiopg.Pool, aiopg.Connection, aiopg.Cursor]:
        """A primary connection inside `BEGIN READ WRITE`; retried once on a fresh connection.

        Retrying is safe here: nothing of the caller's has run yet.
        """
        counters = self._counters(role)
        for attempt in range(2):
            pool = await self._primary_pool(role)
            conn: aiopg.Connection | None = None
            try:
                conn = await pool.acquire()
                cur = await conn.cursor()
                await cur.execute("BEGIN READ WRITE")
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                    await pool.release(conn)
                retryable = is_connection_error(exc) or _is_read_only_error(exc)
                if not retryable:
                    raise
                self._primary_failed(role, exc)
                if attempt and _is_read_only_error(exc):
                    # Still a standby: a proxy in front (HAProxy, PgBouncer) routes a single-host
                    # DSN to a server demoted a moment ago until its checks notice. Mid-failover.
                    raise PrimaryUnavailable(
                        f"{role.name}: the primary DSN reaches a read-only server: "
                        f"{_first_line(exc)}"
                    ) from exc
                if attempt:
                    raise
                counters.write_retries += 1
                continue
            counters.writes += 1
            return pool, conn, cur
        raise AssertionError("unreachable")  # pragma: no cover

    async def _end(
        self,
        role: RolePools,
        pool: aiopg.Pool,
        conn: aiopg.Connection,
        cur: aiopg.Cursor,
        statement: str,
    ) -> None:
        """COMMIT or ROLLBACK, then release; a connection that failed is closed first.

        A failed COMMIT raises (its outcome is unknown to us); a failed ROLLBACK does not
        (the block's own exception is the one that matters, and closing the connection rolls
        the transaction back anyway).
        """
        try:
            if conn.closed:
                if statement == "COMMIT":
                    raise psycopg2.InterfaceError("connection closed before COMMIT")
                return
            await _execute(cur, statement)
        except Exception as exc:
            conn.close()
            if is_connection_error(exc):
                self._primary_failed(role, exc)
            if statement == "COMMIT":
                raise
        except BaseException:
            conn.close()  # cancelled mid-COMMIT/ROLLBACK: the connection's state is unknown
            raise
        finally:
            cur.close()
            await pool.release(conn)

    # -- primaries ---------------------------------------------------------------------------

    async def _primary_pool(self, role: RolePools) -> aiopg.Pool:
        """The role's primary pool, first re-pointed or cleaned if a failure made it stale."""
        state = self._primaries[role.name]
        if state.stale:
            async with state.lock:
                if state.stale:
                    await self._refresh_primary(role, state)
        return role.primary

    async def _refresh_primary(self, role: RolePools, state: _PrimaryState) -> None:
        if not state.multi_host:
            await role.primary.clear()  # a restarted server broke every idle connection
            state.stale = False
            return
        now = self._clock()
        if state.failed_at is not None and now - state.failed_at < self.primary_retry_backoff_s:
            raise PrimaryUnavailable(f"{role.name}: no writable server: {state.last_error}")
        loop = asyncio.get_running_loop()
        try:
            host, port = await loop.run_in_executor(
                None, _locate_host, state.dsn, self.pool_options.connect_timeout_s
            )
        except psycopg2.Error as exc:
            state.failed_at = self._clock()
            state.last_error = _first_line(exc)
            raise PrimaryUnavailable(
                f"{role.name}: no writable server: {state.last_error}"
            ) from exc
        state.failed_at = None
        if (host, port) == state.target:
            await role.primary.clear()
        else:
            new_pool = await open_pool(_single_host_dsn(state.dsn, host, port), self.pool_options)
            old_pool, role.primary = role.primary, new_pool
            state.target = (host, port)
            self._counters(role).primary_relocations += 1
            self._retire(old_pool)
        state.stale = False

    def _primary_failed(self, role: RolePools, exc: BaseException) -> None:
        """Note a failure on the primary: its pool is cleaned or re-pointed before next use."""
        self._primaries[role.name].stale = True
        if is_connection_error(exc):
            self._counters(role).primary_errors += 1

    def _retire(self, pool: aiopg.Pool) -> None:
        """Close a replaced pool; connections still in use close when they are released."""
        pool.close()
        task = asyncio.ensure_future(pool.wait_closed())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _counters(self, role: RolePools) -> RouterCounters:
        return self.counters[role.name]
