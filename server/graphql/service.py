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
`open_operation` opens one for a WebSocket (`realtime.graphql_socket.Operations`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from realtime.graphql_socket import GraphQLWsLimits, GraphQLWsServer
from realtime.graphql_ws import OperationRefused
from realtime.watch import WatchOverflow
from server.common import jsontext
from server.graphql.context import RequestContext
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
from server.graphql.metrics import GraphQLStatsCollector
from server.graphql.persisted import PersistedQueries, check_hash, requested_hash
from server.graphql.results import ResultCache, encode
from server.graphql.throttle import CostThrottle
from server.common.logs import get_logger
from server.adapters.sessions import Session

if TYPE_CHECKING:
    from server.wiring.services import Services

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


class GraphQLService:
    """GraphQL for one node: executor, persisted queries, result cache, cost bucket, and the
    WebSocket server for subscriptions."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.services = services
        self.executor = Executor()
        self.max_cost = settings.graphql_max_cost
        self.max_depth = settings.graphql_max_depth
        self.max_document_bytes = settings.graphql_max_document_bytes
        self.max_nesting = settings.graphql_max_depth + NESTING_ALLOWANCE
        self.persisted = PersistedQueries(services.redis, settings.graphql_persisted_query_ttl_s)
        self.results = ResultCache(
            services.cache, settings.graphql_result_cache_ttl_s, services.catalog.stock.fresh_s
        )
        self.throttle = CostThrottle(
            services.rate_limiter,
            settings.graphql_throttle_maximum,
            settings.graphql_throttle_restore_per_second,
        )
        self.ws = GraphQLWsServer(
            self,
            GraphQLWsLimits(
                max_message_bytes=settings.graphql_ws_max_message_bytes,
                max_operations=settings.graphql_ws_max_subscriptions,
                init_timeout_s=settings.graphql_ws_init_timeout_s,
                messages_per_second=settings.graphql_ws_messages_per_second,
                message_burst=settings.graphql_ws_message_burst,
                max_connections_per_ip=settings.cable_max_connections_per_ip,
            ),
        )
        self.executed = 0  # operations that reached execution (tests: "no resolver ran")
        self.refusals: dict[str, int] = {}  # refused before execution, by error code
        services.metrics.registry.register(GraphQLStatsCollector(self))

    @classmethod
    async def open(cls, services: Services) -> GraphQLService:
        """Build the service and its schema."""
        service = cls(services)
        await service.executor.start()
        return service

    def start(self) -> None:
        """Start background work (WebSocket keep-alives)."""
        self.ws.start()

    async def drain(self) -> None:
        """Close WebSockets with 1001 so clients reconnect to another node."""
        await self.ws.drain()

    async def stop(self) -> None:
        """Cancel running subscriptions."""
        await self.ws.stop()

    # --- HTTP -------------------------------------------------------------------------------

    async def run_http(
        self, request: GraphQLRequest, *, method: str, session: Session | None, remote_ip: str
    ) -> Outcome:
        """Answer one GraphQL-over-HTTP request (GET allows queries only)."""
        caller = _caller(session, remote_ip)
        report: CostReport | None = None
        try:
            text, register = await self._document(request)
            parsed = self.executor.parse(text)
            operation_name = _optional_str(request.operation_name, "operationName")
            variables = _variables(request.variables)
            kind = self.executor.operation_type(parsed, operation_name)
            if method == "GET" and kind in ("mutation", "subscription"):
                return Outcome(
                    _body([error(f"{kind}s are sent with POST", OPERATION_NOT_SUPPORTED)], None),
                    "method_not_allowed",
                )
            if kind == "subscription":
                raise GraphQLRequestError(
                    OPERATION_NOT_SUPPORTED, "subscriptions run over the WebSocket at /graphql"
                )
            context = RequestContext(self.services, session, remote_ip)
            prepared = await self.executor.prepare(parsed, operation_name, variables, context)
            report = self._analyse(prepared)
            check_limits(report, max_cost=self.max_cost, max_depth=self.max_depth)
            charged = await self.throttle.charge(caller, report.requested)
            if not charged.allowed:
                retry_after_s = self.throttle.retry_after_s(charged)
                errors = [
                    error(
                        f"throttled: this query costs {report.requested} and "
                        f"{charged.remaining} are available; retry in {retry_after_s:.1f}s",
                        THROTTLED,
                    )
                ]
                cost = self._cost(report.requested, None, charged.remaining)
                self._count_refusal(THROTTLED)
                return Outcome(_body(errors, cost), "throttled", retry_after_s)
            if register is not None:
                await self.persisted.put(register, text)
        except GraphQLRequestError as refused:
            return await self._refused(refused, report, caller)
        data, response, actual = await self._execute(prepared, report)
        remaining = charged.remaining
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
        self._count_refusal(refused.code)
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
        return await self.services.sessions.resolve(token)

    async def open_operation(
        self, payload: Any, session: Session | None, remote_ip: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Prepare an operation sent over a WebSocket (`subscribe`/`start` payload) and return
        its results as they come (a query or mutation: one). Refusals before execution raise
        `OperationRefused` with the errors."""
        caller = _caller(session, remote_ip)
        try:
            request = GraphQLRequest.from_json(payload)
            text, register = await self._document(request)
            parsed = self.executor.parse(text)
            context = RequestContext(self.services, session, remote_ip)
            prepared = await self.executor.prepare(
                parsed,
                _optional_str(request.operation_name, "operationName"),
                _variables(request.variables),
                context,
            )
            report = self._analyse(prepared)
            check_limits(report, max_cost=self.max_cost, max_depth=self.max_depth)
            charged = await self.throttle.charge(caller, report.requested)
            if not charged.allowed:
                retry_after_s = self.throttle.retry_after_s(charged)
                raise GraphQLRequestError(
                    THROTTLED,
                    f"throttled: this operation costs {report.requested} and "
                    f"{charged.remaining} are available; retry in {retry_after_s:.1f}s",
                    retryAfter=retry_after_s,
                )
            if register is not None:
                await self.persisted.put(register, text)
        except GraphQLRequestError as refused:
            self._count_refusal(refused.code)
            raise OperationRefused(refused.errors) from None
        return self._results(prepared, report, charged.remaining)

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
