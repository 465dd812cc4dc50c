"""The GraphQL engine: parse, validate, prepare and execute documents against the schema.

**This module is the one place that knows the engine.** Everything else (HTTP, WebSocket,
cost, cache, throttle) goes through `Executor`: `parse(text)` (cached), `prepare(parsed,
operation_name, variables, ctx)` (operation chosen, variables coerced: nothing has run yet),
`execute(prepared)` and `subscribe(prepared)`. A faster engine replaces this class.

Engine: tartiflette 1.4. Its schema registry is global per schema name and refuses a second
registration of a field, so every `Executor` registers the resolvers of `RESOLVER_MODULES`
under a schema name of its own (two nodes in one process each cook one). Resolvers reach the
node only through `ctx` (`server.graphql.context.RequestContext`).

Documents are parsed with tartiflette's `parse_to_document` (libgraphqlparser, then its
validators) and kept in a per-executor LRU of `PARSE_CACHE_ENTRIES` by text. Queries and
mutations then run as compiled plans (`server.graphql.compiled`: the document walked once,
per operation, into a plan kept with the parsed document), which is what makes execution
faster than graphql-core's; operations plans do not model (introspection, subscriptions) run
on tartiflette's `build_execution_context` and `execute_operation`. Preparing and executing
are separate so the cost analysis can run between the two.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

from tartiflette import Engine, Resolver, Subscription, TartifletteError
from tartiflette.execution.context import ExecutionContext, build_execution_context
from tartiflette.execution.execute import create_source_event_stream, execute_operation
from tartiflette.language.ast import OperationDefinitionNode
from tartiflette.language.parsers.libgraphqlparser import parse_to_document
from tartiflette.types.list import GraphQLList

from server.graphql.resolvers import carts

from server.graphql.resolvers import catalog

from server.graphql.resolvers import orders

from server.graphql.resolvers import users
from server.graphql.compiled import Plan, compile_plan
from server.graphql.cost import FieldShape, Shapes
from server.graphql.errors import (
    BAD_USER_INPUT,
    OPERATION_RESOLUTION_FAILURE,
    PARSE_FAILED,
    VALIDATION_FAILED,
    GraphQLRequestError,
    coerce_error,
)

# Modules with SDL (beside them) and resolvers; `catalog` declares the root types.
RESOLVER_MODULES: tuple[ModuleType, ...] = (catalog, carts, orders, users)
PARSE_CACHE_ENTRIES = 512
_schema_numbers = itertools.count(1)


@dataclass(slots=True)
class ParsedDocument:
    """A parsed, validated document: its operations and fragments by name."""

    text: str
    document: Any
    operations: dict[str | None, Any]
    fragments: dict[str, Any]
    normalized: str | None = None  # filled by the result cache when it first needs it
    costs: dict[str | None, Any] = field(default_factory=dict)  # per operation, no variables
    plans: dict[str | None, Plan | None] = field(default_factory=dict)  # None: no plan


@dataclass(slots=True)
class Prepared:
    """An operation ready to run: chosen, variables coerced; nothing has executed yet."""

    parsed: ParsedDocument
    operation: Any
    operation_type: str  # "query", "mutation" or "subscription"
    variables: dict[str, Any]
    context: Any
    _execution: ExecutionContext | None  # tartiflette's, when there is no plan
    _plan: Plan | None = None


async def default_resolver(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    """Fields without a resolver read a dict key (the domain's values are dicts), else an
    attribute."""
    if type(parent) is dict:
        return parent.get(info.field_name)
    return getattr(parent, info.field_name, None)


class Executor:
    """Parses, prepares and runs GraphQL operations against the Final Market schema."""

    def __init__(
        self,
        *,
        coerce_list_concurrently: bool | None = None,
        coerce_parent_concurrently: bool | None = None,
        modules: tuple[ModuleType, ...] = RESOLVER_MODULES,
        compiled_plans: bool = True,
    ) -> None:
        """The two flags are tartiflette's (None: its defaults, both concurrent). Resolvers do
        not depend on them: list resolvers prefetch their rows' loads (`loaders.py`).
        `modules` (SDL beside resolvers) is the schema: the product's unless a benchmark
        brings its own; `compiled_plans=False` runs everything on tartiflette's executor."""
        self.schema_name = f"finalmarket-{next(_schema_numbers)}"
        self.modules = modules
        self.compiled_plans = compiled_plans
        self._engine = Engine(
            sdl=[str(module.SDL) for module in modules],
            schema_name=self.schema_name,
            error_coercer=coerce_error,
            custom_default_resolver=default_resolver,
            query_cache_decorator=None,  # `parse` keeps its own cache
            coerce_list_concurrently=coerce_list_concurrently,
            coerce_parent_concurrently=coerce_parent_concurrently,
        )
        self._parsed: OrderedDict[str, ParsedDocument] = OrderedDict()
        self.shapes: Shapes = {}
        self._cooked = False

    async def start(self) -> None:
        """Register the resolvers under this executor's schema name and build the schema."""
        if self._cooked:
            return
        for module in self.modules:
            for name, function in module.RESOLVERS.items():
                Resolver(name, schema_name=self.schema_name)(function)
            for name, function in module.SUBSCRIPTIONS.items():
                Subscription(name, schema_name=self.schema_name)(function)
        await self._engine.cook()
        self._schema: Any = self._engine._schema
        self._build_response: Any = self._engine._build_response
        self.shapes = _shapes(self._schema)
        self._cooked = True

    # --- parse ------------------------------------------------------------------------------

    def parse(self, text: str) -> ParsedDocument:
        """The parsed and validated document (cached by text); `GraphQLRequestError` with
        `GRAPHQL_PARSE_FAILED` or `GRAPHQL_VALIDATION_FAILED` otherwise. Call only with text
        that passed `server.graphql.document.check_document`."""
        parsed = self._parsed.get(text)
        if parsed is not None:
            self._parsed.move_to_end(text)
            return parsed
        try:
            document = parse_to_document(text, self._schema)
        except TartifletteError as exc:
            raise GraphQLRequestError.with_errors(PARSE_FAILED, [exc.coerce_value()]) from None
        except Exception:  # the engine's own failure on odd input: still the client's document
            raise GraphQLRequestError(PARSE_FAILED, "the document could not be parsed") from None
        if document.validators.errors:
            raise GraphQLRequestError.with_errors(
                VALIDATION_FAILED, [e.coerce_value() for e in document.validators.errors]
            )
        operations: dict[str | None, Any] = {}
        fragments: dict[str, Any] = {}
        for definition in document.definitions:
            if isinstance(definition, OperationDefinitionNode):
                operations[definition.name.value if definition.name else None] = definition
            else:
                fragments[definition.name.value] = definition
        parsed = ParsedDocument(text, document, operations, fragments)
        self._parsed[text] = parsed
        if len(self._parsed) > PARSE_CACHE_ENTRIES:
            self._parsed.popitem(last=False)
        return parsed

    def operation_type(self, parsed: ParsedDocument, operation_name: str | None) -> str | None:
        """The type of the operation `operation_name` selects, or None if it selects none."""
        operation = _choose(parsed, operation_name)
        return None if operation is None else str(operation.operation_type)

    # --- prepare and run --------------------------------------------------------------------

    async def prepare(
        self,
        parsed: ParsedDocument,
        operation_name: str | None,
        variables: Mapping[str, Any] | None,
        context: Any,
    ) -> Prepared:
        """Choose the operation and coerce the variables (`OPERATION_RESOLUTION_FAILURE`,
        `BAD_USER_INPUT`); no resolver runs."""
        if _choose(parsed, operation_name) is None:
            message = (
                f"unknown operation named {operation_name!r}"
                if operation_name
                else "the document has several operations: give operationName"
            )
            raise GraphQLRequestError(OPERATION_RESOLUTION_FAILURE, message)
        plan = await self._plan(parsed, operation_name)
        if plan is not None:
            values, refused = await plan.coerce_variables(dict(variables or {}), context)
            if refused:
                raise GraphQLRequestError.with_errors(
                    BAD_USER_INPUT, [e.coerce_value() for e in refused]
                )
            operation = plan.operation
            return Prepared(
                parsed, operation, str(operation.operation_type), values, context, None, plan
            )
        execution, errors = await build_execution_context(
            self._schema,
            parsed.document,
            None,
            context,
            dict(variables or {}),
            cast(str, operation_name),  # None is what tartiflette's own callers pass too
        )
        if errors or execution is None:
            raise GraphQLRequestError.with_errors(
                BAD_USER_INPUT, [e.coerce_value() for e in errors or ()]
            )
        operation = execution.operation
        return Prepared(
            parsed,
            operation,
            str(operation.operation_type),
            execution.variable_values or {},
            context,
            execution,
        )

    async def _plan(self, parsed: ParsedDocument, operation_name: str | None) -> Plan | None:
        """The operation's compiled plan (made once per parsed document), or None."""
        if not self.compiled_plans:
            return None
        plans = parsed.plans
        if operation_name in plans:
            return plans[operation_name]
        plan = await compile_plan(self._schema, parsed.document, operation_name)
        plans[operation_name] = plan
        return plan

    async def execute(self, prepared: Prepared) -> dict[str, Any]:
        """Run a query or mutation; the response `{data, errors?}`."""
        plan = prepared._plan
        if plan is not None:
            data, errors = await plan.execute(None, prepared.context, prepared.variables)
            if not errors:
                return {"data": data}
            located: dict[str, Any] = await self._build_response(data=data, errors=errors)
            return located
        execution = prepared._execution
        assert execution is not None  # prepared without a plan
        data = await execute_operation(execution, execution.operation, None)
        response: dict[str, Any] = await self._build_response(data=data, errors=execution.errors)
        return response

    async def subscribe(self, prepared: Prepared) -> AsyncIterator[dict[str, Any]]:
        """Run a subscription: one response per event of its source stream. The source's
        errors before its first event (unknown product, not signed in) are raised."""
        execution = prepared._execution
        assert execution is not None  # subscriptions have no plan
        source: Any = await create_source_event_stream(
            self._schema,
            prepared.parsed.document,
            self._build_response,
            None,
            prepared.context,
            prepared.variables,
            prepared.operation.name.value if prepared.operation.name else None,
        )
        if isinstance(source, dict):  # errors the engine found (reported, not raised)
            yield source
            return
        try:
            async for payload in source:
                run = ExecutionContext(
                    self._schema,
                    execution.fragments,
                    execution.operation,
                    prepared.context,
                    payload,
                    prepared.variables,
                )
                data = await execute_operation(run, run.operation, payload)
                yield await self._build_response(data=data, errors=run.errors)
        finally:
            await source.aclose()


def _choose(parsed: ParsedDocument, operation_name: str | None) -> Any:
    if operation_name:
        return parsed.operations.get(operation_name)
    if len(parsed.operations) == 1:
        return next(iter(parsed.operations.values()))
    return None


def _shapes(schema: Any) -> Shapes:
    """What the cost rules need to know of every object field of the schema."""
    shapes: dict[str, dict[str, FieldShape]] = {}
    for type_name, definition in schema.type_definitions.items():
        fields = getattr(definition, "implemented_fields", None)
        if not fields:
            continue
        table = shapes[type_name] = {}
        for field_name, definition_field in fields.items():
            gql_type, is_list = definition_field.gql_type, False
            while not isinstance(gql_type, str):  # unwrap non-null and list wrappers
                is_list = is_list or isinstance(gql_type, GraphQLList)
                gql_type = gql_type.gql_type
            named = schema.find_type(gql_type)
            table[field_name] = FieldShape(
                type_name=gql_type,
                leaf=not getattr(named, "implemented_fields", None),
                is_list=is_list,
                connection=gql_type.endswith("Connection"),
            )
    return shapes
