"""The GraphQL request pipeline of a node, free of HTTP and WebSocket details.

For each operation, in order (ARCHITECTURE section 5):
1. the document: the query text, or an automatic persisted query looked up by hash;
2. size and bracket nesting checked before parsing (`document.check_document`);
3. parse and validate (cached), choose the operation, coerce the variables (`Executor`);
4. static cost and depth with the variables applied (`cost.analyse`): over a limit, refused
   with the cost, before any resolver runs;
5. the cost is charged to the caller's bucket (`throttle.CostThrottle`): `THROTTLED` if empty;
6. execution with per-request DataLoaders, through the result cache for public queries;
7. the actual cost is computed from the result, the difference refunded, and every response
   carries `extensions.cost` with the bucket's state.

`run_http` answers GraphQL-over-HTTP requests (the handler maps `Outcome.kind` to a status);
`open_operation` opens one for a WebSocket (`realtime.graphql_socket`, built around this
service by the wiring).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from realtime.graphql_ws import OperationRefused
from realtime.watch import WatchOverflow
from server.adapters.cache import CachedLoader
from server.adapters.ratelimit import LeasedRateLimiter, retry_after_whole_s
from server.adapters.sessions import Session, SessionStore
from server.common import jsontext
from server.common.logs import get_logger
from server.graphql.context import GraphQLDomain, RequestContext
from server.graphql.cost import CostReport, analyse, check_limits
from server.graphql.document import check_document
from server.graphql.errors import (
    BAD_REQUEST,
    MAX_COST_EXCEEDED,
    MAX_DEPTH_EXCEEDED,
    OPERATION_NOT_SUPPORTED,
    PERSISTED_QUERY_NOT_FOUND,
    SUBSCRIPTION_LAGGED,
    THROTTLED,
    GraphQLRequestError,
    describe_exception,
    error,
)
from server.graphql.executor import Executor, ParsedDocument, Prepared
from server.graphql.persisted import PersistedQueries, check_hash, requested_hash
from server.graphql.results import ResultCache, encode
from server.graphql.throttle import CostThrottle

_log = get_logger("finalmarket.graphql")

# Root fields that read the caller's own data: their results are never cached or shared.
PRIVATE_ROOT_FIELDS = frozenset({"me", "cart", "orders", "notifications"})
# Nesting of brackets allowed in a document beyond the depth limit (arguments, lists).
NESTING_ALLOWANCE = 32

OutcomeKind = Literal["ok", "bad_request", "request_error", "throttled", "method_not_allowed"]


@dataclass(frozen=True, slots=True)
class GraphQLRequest:
    """One GraphQL-over-HTTP request's parameters, as the client sent them."""

    query: Any = None
    operation_name: Any = None
    variables: Any = None
    extensions: Any = None

    @classmethod
    def from_json(cls, body: Any) -> GraphQLRequest:
        """From a POST body (a JSON object); `BAD_REQUEST` for anything else."""
        if not isinstance(body, dict):
            raise GraphQLRequestError(BAD_REQUEST, "the body must be a JSON object")
        return cls(
            body.get("query"),
            body.get("operationName"),
            body.get("variables"),
            body.get("extensions"),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """An HTTP answer in GraphQL terms; the handler turns `kind` into a status code."""

    body: bytes
    kind: OutcomeKind = "ok"
    retry_after_s: float | None = None
    public: bool = False  # a shared cache may keep it (anonymous caller, public query, no error)


@dataclass(frozen=True, slots=True)
class GraphQLLimits:
    """The node's GraphQL bounds (settings `FM_GRAPHQL_*`)."""

    max_cost: int
    max_depth: int
    max_document_bytes: int
    persisted_query_ttl_s: int
    result_cache_ttl_s: float
    throttle_maximum: int
    throttle_restore_per_second: float


class GraphQLService:
    """GraphQL for one node: executor, persisted queries, result cache and cost bucket. The
    transports (the HTTP handler, the WebSocket server) are built by the wiring around it."""

    def __init__(
        self,
        domain: GraphQLDomain,
        *,
        sessions: SessionStore,
        redis: Any,
        cache: CachedLoader,
        rate_limiter: LeasedRateLimiter,
        limits: GraphQLLimits,
    ) -> None:
        self.domain = domain
        self.sessions = sessions
        self.executor = Executor()
        self.max_cost = limits.max_cost
        self.max_depth = limits.max_depth
        self.max_document_bytes = limits.max_document_bytes
        self.max_nesting = limits.max_depth + NESTING_ALLOWANCE
        self.persisted = PersistedQueries(redis, limits.persisted_query_ttl_s)
        self.results = ResultCache(cache, limits.result_cache_ttl_s, domain.catalog.stock.fresh_s)
        self.throttle = CostThrottle(
            rate_limiter, limits.throttle_maximum, limits.throttle_restore_per_second
        )
        self.executed = 0  # operations that reached execution (tests: "no resolver ran")
        self.refusals: dict[str, int] = {}  # refused before execution, by error code

    async def start(self) -> None:
        """Build the schema (once per node, before serving)."""
        await self.executor.start()

    # --- HTTP -------------------------------------------------------------------------------

    async def run_http(
        self, request: GraphQLRequest, *, method: str, session: Session | None, remote_ip: str
    ) -> Outcome:
        """Answer one GraphQL-over-HTTP request (GET allows queries only)."""
        caller = _caller(session, remote_ip)
        progress = _Progress()
        try:
            admitted = await self._admit(
                request, session, remote_ip, progress, http_method=method, noun="query"
            )
        except _MethodNotAllowed as refused:
            return Outcome(_body(refused.errors, None), "method_not_allowed")
        except _Throttled as refused:
            cost = self._cost(refused.requested, None, refused.remaining)
            errors = [error(str(refused), THROTTLED)]  # over HTTP the wait is in Retry-After
            return Outcome(_body(errors, cost), "throttled", refused.retry_after_s)
        except GraphQLRequestError as refused:
            return await self._refused(refused, progress.report, caller)
        prepared, report = admitted.prepared, admitted.report
        data, response, actual = await self._execute(prepared, report)
        remaining = admitted.remaining
        if actual < report.requested:
            remaining = (await self.throttle.refund(caller, report.requested - actual)).remaining
        cost = self._cost(report.requested, actual, remaining)
        # Shared caches may keep answers to anonymous callers' public queries without errors.
        public = session is None and not report.private
        if data is not None:  # from the result cache (or stored in it): encoded already
            body = b'{"data":%s,"extensions":%s}' % (data, encode({"cost": cost}))
            return Outcome(body, public=public)
        assert response is not None
        response["extensions"] = {"cost": cost}
        return Outcome(encode(response), public=public and not response.get("errors"))

    async def _admit(
        self,
        request: GraphQLRequest,
        session: Session | None,
        remote_ip: str,
        progress: _Progress,
        *,
        http_method: str | None,
        noun: str,
    ) -> _Admitted:
        """Steps 1-5 of the pipeline, shared by HTTP and WebSocket: the document, parse and
        validate, the operation and its variables, cost and depth limits, the charge to the
        caller's bucket, then the persisted query's registration. Raises `GraphQLRequestError`
        (counted) for any refusal; `progress.report` holds the cost once it is known.
        `http_method` is None on a WebSocket, where every operation type is allowed."""
        try:
            text, register = await self._document(request)
            parsed = self.executor.parse(text)
            operation_name = _optional_str(request.operation_name, "operationName")
            variables = _variables(request.variables)
            if http_method is not None:
                kind = self.executor.operation_type(parsed, operation_name)
                if http_method == "GET" and kind in ("mutation", "subscription"):
                    raise _MethodNotAllowed(OPERATION_NOT_SUPPORTED, f"{kind}s are sent with POST")
                if kind == "subscription":
                    raise GraphQLRequestError(
                        OPERATION_NOT_SUPPORTED, "subscriptions run over the WebSocket at /graphql"
                    )
            context = RequestContext(self.domain, session, remote_ip)
            prepared = await self.executor.prepare(parsed, operation_name, variables, context)
            report = progress.report = self._analyse(prepared)
            check_limits(report, max_cost=self.max_cost, max_depth=self.max_depth)
            charged = await self.throttle.charge(_caller(session, remote_ip), report.requested)
            if not charged.allowed:
                raise _Throttled(
                    report.requested, charged.remaining, self.throttle.retry_after_s(charged), noun
                )
            if register is not None:
                await self.persisted.put(register, text)
        except _MethodNotAllowed:
            raise  # the wrong method, not a refused operation: not counted
        except GraphQLRequestError as refused:
            self._count_refusal(refused.code)
            raise
        return _Admitted(prepared, report, charged.remaining)

    async def _document(self, request: GraphQLRequest) -> tuple[str, str | None]:
        """(document text, hash to register it under after it validates, or None)."""
        sha = requested_hash(request.extensions)
        query = request.query
        if query is not None and not isinstance(query, str):
            raise GraphQLRequestError(BAD_REQUEST, "query must be a string")
        if query is None or query == "":
            if sha is None:
                raise GraphQLRequestError(BAD_REQUEST, "give a query (or a persisted query hash)")
            found = await self.persisted.get(sha)
            if found is None:
                raise GraphQLRequestError(PERSISTED_QUERY_NOT_FOUND, "PersistedQueryNotFound")
            return found, None
        check_document(query, max_bytes=self.max_document_bytes, max_nesting=self.max_nesting)
        if sha is not None:
            check_hash(query, sha)
        return query, sha

    def _analyse(self, prepared: Prepared) -> CostReport:
        operation = prepared.operation
        parsed: ParsedDocument = prepared.parsed
        name = operation.name.value if operation.name else None
        # Without variable definitions the analysis depends on the document alone: memoised.
        if not operation.variable_definitions:
            report = parsed.costs.get(name)
            if report is not None:
                return report
        root = {"query": "Query", "mutation": "Mutation", "subscription": "Subscription"}
        report = analyse(
            operation,
            parsed.fragments,
            prepared.variables,
            self.executor.shapes,
            root_type=root[prepared.operation_type],
            private_roots=PRIVATE_ROOT_FIELDS,
        )
        if not operation.variable_definitions:
            parsed.costs[name] = report
        return report

    async def _execute(
        self, prepared: Prepared, report: CostReport
    ) -> tuple[bytes | None, dict[str, Any] | None, int]:
        """(encoded data if cacheable, else the response; actual cost)."""

        async def run() -> tuple[dict[str, Any], int]:
            self.executed += 1
            response = await self.executor.execute(prepared)
            return response, report.actual(response.get("data"))

        if report.private or not self.results.enabled:
            response, actual = await run()
            return None, response, actual
        name = prepared.operation.name.value if prepared.operation.name else None
        key = self.results.key(prepared.parsed, name, prepared.variables)
        return await self.results.get_or_run(key, report.live, run)

    def _count_refusal(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    async def _refused(
        self, refused: GraphQLRequestError, report: CostReport | None, caller: str
    ) -> Outcome:
        cost = None
        if refused.code in (MAX_COST_EXCEEDED, MAX_DEPTH_EXCEEDED) and report is not None:
            status = await self.throttle.charge(caller, 0)  # look only
            cost = self._cost(report.requested, None, status.remaining)
        # A request that is not well-formed GraphQL-over-HTTP is 400 whatever the media type.
        kind: OutcomeKind = "bad_request" if refused.code == BAD_REQUEST else "request_error"
        return Outcome(_body(refused.errors, cost), kind)

    def _cost(self, requested: int, actual: int | None, remaining: int) -> dict[str, Any]:
        return {
            "requestedQueryCost": requested,
            "actualQueryCost": actual,
            "throttleStatus": self.throttle.status(remaining),
        }

    # --- WebSocket --------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Session | None:
        """The session of a token sent in a WebSocket's `connection_init`."""
        return await self.sessions.resolve(token)

    async def open_operation(
        self, payload: Any, session: Session | None, remote_ip: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Prepare an operation sent over a WebSocket (`subscribe`/`start` payload) and return
        its results as they come (a query or mutation: one). Refusals before execution raise
        `OperationRefused` with the errors."""
        try:
            request = GraphQLRequest.from_json(payload)
        except GraphQLRequestError as refused:
            self._count_refusal(refused.code)
            raise OperationRefused(refused.errors) from None
        try:
            admitted = await self._admit(
                request, session, remote_ip, _Progress(), http_method=None, noun="operation"
            )
        except GraphQLRequestError as refused:
            raise OperationRefused(refused.errors) from None
        return self._results(admitted.prepared, admitted.report, admitted.remaining)

    async def _results(
        self, prepared: Prepared, report: CostReport, remaining: int
    ) -> AsyncIterator[dict[str, Any]]:
        self.executed += 1
        cost = self._cost(report.requested, report.requested, remaining)
        if prepared.operation_type != "subscription":
            response = await self.executor.execute(prepared)
            response["extensions"] = {"cost": cost}
            yield response
            return
        try:
            async for response in self.executor.subscribe(prepared):
                response["extensions"] = {"cost": cost}  # as charged when it was subscribed
                yield response
        except WatchOverflow:
            message = "the subscription fell too far behind its stream; subscribe again"
            raise OperationRefused([error(message, SUBSCRIPTION_LAGGED)]) from None
        except Exception as exc:  # the source failed: unknown product, not signed in, ...
            raise OperationRefused([describe_exception(exc)]) from None


@dataclass(slots=True)
class _Progress:
    """How far a request got before a refusal: its cost report, once analysed."""

    report: CostReport | None = None


@dataclass(frozen=True, slots=True)
class _Admitted:
    """An operation that passed every check and was charged: ready to execute."""

    prepared: Prepared
    report: CostReport
    remaining: int


class _MethodNotAllowed(GraphQLRequestError):
    """A mutation or subscription sent with GET (HTTP answers 405)."""


class _Throttled(GraphQLRequestError):
    """The caller's cost bucket cannot pay for the operation now."""

    def __init__(self, requested: int, remaining: int, retry_after_s: float, noun: str) -> None:
        super().__init__(
            THROTTLED,
            f"throttled: this {noun} costs {requested} and {remaining} are available; "
            f"retry in {retry_after_whole_s(retry_after_s)}s",  # as Retry-After says
            retryAfter=retry_after_s,
        )
        self.requested = requested
        self.remaining = remaining
        self.retry_after_s = retry_after_s


def _caller(session: Session | None, remote_ip: str) -> str:
    return f"user:{session.user_id}" if session is not None else f"ip:{remote_ip}"


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise GraphQLRequestError(BAD_REQUEST, f"{name} must be a string")
    return value


def _variables(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):  # GET: JSON in the query string
        try:
            value = jsontext.loads(value)
        except ValueError:
            raise GraphQLRequestError(BAD_REQUEST, "variables is not JSON") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GraphQLRequestError(BAD_REQUEST, "variables must be a JSON object")
    return value


def _body(errors: list[dict[str, Any]], cost: dict[str, Any] | None) -> bytes:
    response: dict[str, Any] = {"errors": errors}
    if cost is not None:
        response["extensions"] = {"cost": cost}
    return encode(response)
