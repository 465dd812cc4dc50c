"""Compiled execution of validated GraphQL queries and mutations over a tartiflette schema.

tartiflette parses and validates (and caches parsed documents); its executor then walks the
document for every request, wraps every field in several coroutines (directive hooks,
argument and output coercers) and builds a `ResolveInfo` per field and row. For the queries
a storefront repeats all day that walk is the cost: measured here it is 2-4x graphql-core's.

This module walks each (document, operation) once and keeps a plan: per selected field its
response key, resolver (or a plain dict/attribute read), literal arguments already coerced,
variable arguments as lookups, and how to complete its value (scalar serialiser, list,
object). Executing a plan is a loop over that plan. Custom resolvers still run as tartiflette
calls them, `(parent, args, ctx, info)`, with `info` a per-field constant (no per-row path);
every awaitable of one level is awaited together, so DataLoaders batch a level into one
statement. Errors are located (message, path, locations) and nulls propagate to the nearest
nullable position as the spec requires.

Anything the plan does not model (subscriptions, introspection beyond `__typename`, abstract
types, field directives other than literal `@skip`/`@include`) is reported by `compile_plan`
returning None, and the caller runs tartiflette's own executor: results are the same,
only slower.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tartiflette.coercers.variables import coerce_variables
from tartiflette.constants import UNDEFINED_VALUE
from tartiflette.execution.collect import collect_executable_variable_definitions
from tartiflette.language.ast import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    NamedTypeNode,
    NonNullTypeNode,
    OperationDefinitionNode,
    VariableNode,
)
from tartiflette.types.enum import GraphQLEnumType
from tartiflette.types.list import GraphQLList
from tartiflette.types.non_null import GraphQLNonNull
from tartiflette.types.object import GraphQLObjectType
from tartiflette.types.scalar import GraphQLScalarType
from tartiflette.utils.errors import located_error

__all__ = ["CompiledExecutor", "Plan", "compile_plan", "direct", "renamed"]

_LEAF, _OBJECT, _LIST, _TYPENAME = 0, 1, 2, 3
DEFAULT_MAX_PLANS = 512
_MAX_INT = 2_147_483_647


class Unsupported(Exception):
    """The document uses something plans do not model; run tartiflette's executor."""


def direct(function: Callable[..., Any]) -> Callable[..., Any]:
    """Declare a resolver that needs no coroutine: it returns its value, or a future (a
    DataLoader's `load`). Plans call it as it is, so a list of 50 rows costs 50 calls rather
    than 50 tasks; tartiflette (which accepts only coroutine functions) gets an async wrapper.
    """

    async def resolver(parent: Any, args: Any, ctx: Any, info: Any) -> Any:
        value = function(parent, args, ctx, info)
        return (await value) if inspect.isawaitable(value) else value

    resolver.__name__ = function.__name__
    resolver.__qualname__ = function.__qualname__
    resolver.__doc__ = function.__doc__
    resolver.direct = function  # type: ignore[attr-defined]
    return resolver


def renamed(source_key: str) -> Callable[..., Any]:
    """The resolver of a field whose value is the parent's `source_key` (a dict key, else an
    attribute): `priceCents` reads `price_cents`. Plans read it directly, with no call."""

    def read(parent: Any, args: Any, ctx: Any, info: Any) -> Any:
        if type(parent) is dict:
            return parent.get(source_key)
        return getattr(parent, source_key, None)

    read.__name__ = read.__qualname__ = f"renamed_{source_key}"
    resolver = direct(read)
    resolver.source_key = source_key  # type: ignore[attr-defined]
    return resolver


@dataclass(slots=True)
class _Info:
    """What a resolver may read from `info` under a plan: constant per field, no path."""

    field_name: str
    field_nodes: list[FieldNode]
    return_type: Any
    parent_type: Any
    schema: Any
    operation: OperationDefinitionNode
    fragments: dict[str, FragmentDefinitionNode]
    path: None = None


@dataclass(slots=True)
class _Type:
    """How to complete a value at one position of the response."""

    nullable: bool
    kind: int
    serialize: Callable[[Any], Any] | None = None
    item: _Type | None = None
    fields: tuple[_Field, ...] = ()
    type_name: str = ""


@dataclass(slots=True)
class _Field:
    key: str
    name: str
    type: _Type
    nodes: list[FieldNode]
    resolver: Callable[..., Any] | None
    args: dict[str, Any]
    variable_args: tuple[tuple[str, str, Any], ...]  # (argument, variable, default)
    info: _Info | None
    source: str = ""  # the parent's key or attribute a default read takes (the name, or
    # a `renamed` field's source key)

    def __post_init__(self) -> None:
        self.source = self.source or self.name


@dataclass(slots=True)
class _Frame:
    """One position of the response (for paths and null propagation)."""

    parent: _Frame | None
    container: Any
    key: str | int
    nullable: bool

    def path(self) -> list[str | int]:
        keys: list[str | int] = []
        frame: _Frame | None = self
        while frame is not None:
            keys.append(frame.key)
            frame = frame.parent
        keys.reverse()
        return keys


@dataclass(slots=True)
class _Run:
    """State of one execution."""

    ctx: Any
    variables: dict[str, Any]
    root: dict[str, Any]
    errors: list[Any] = field(default_factory=list)
    pending: list[tuple[Any, _Field, dict[str, Any], _Frame | None]] = field(default_factory=list)
    data_nulled: bool = False


# --- serialisers: the built-in scalars' fast paths, tartiflette's coercion otherwise ---------


def _serialize_string(value: Any) -> Any:
    if type(value) is str:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise TypeError(f"String cannot represent value: < {value!r} >.")


def _serialize_int(value: Any) -> Any:
    if type(value) is int and -_MAX_INT - 1 <= value <= _MAX_INT:
        return value
    raise TypeError(f"Int cannot represent value: < {value!r} >.")


def _serialize_id(value: Any) -> Any:
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    raise TypeError(f"ID cannot represent value: < {value!r} >.")


def _serialize_boolean(value: Any) -> Any:
    if type(value) is bool:
        return value
    raise TypeError(f"Boolean cannot represent a non boolean value: < {value!r} >.")


_BUILTIN_SERIALIZERS: dict[str, Callable[[Any], Any]] = {
    "String": _serialize_string,
    "Int": _serialize_int,
    "ID": _serialize_id,
    "Boolean": _serialize_boolean,
}


def _scalar_serializer(scalar: GraphQLScalarType) -> Callable[[Any], Any]:
    builtin = _BUILTIN_SERIALIZERS.get(scalar.name)
    if builtin is not None:
        return builtin
    coerce_output: Any = scalar.coerce_output

    def serialize(value: Any) -> Any:
        result = coerce_output(value)
        if result is UNDEFINED_VALUE:
            raise TypeError(f"{scalar.name} cannot represent value: < {value!r} >.")
        return result

    return serialize


def _enum_serializer(enum: GraphQLEnumType) -> Callable[[Any], Any]:
    names = {value.value: value.name for value in enum.values}

    def serialize(value: Any) -> Any:
        name = names.get(value)
        if name is None:
            raise TypeError(f"Enum {enum.name} cannot represent value: < {value!r} >.")
        return name

    return serialize


# --- compilation -------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """A compiled operation: run it with `execute`."""

    operation: OperationDefinitionNode
    fields: tuple[_Field, ...]
    serial: bool  # mutations run their root fields one after another
    variable_definitions: Any  # tartiflette's executable definitions, for coercion

    simple_variables: tuple[tuple[str, str], ...] | None = None  # (name, built-in scalar)

    async def coerce_variables(
        self, raw: dict[str, Any] | None, ctx: Any
    ) -> tuple[dict[str, Any], list[Any]]:
        """The request's variables coerced to their declared types (tartiflette's rules).

        Variables of built-in scalar types given with values of exactly their Python type
        are taken as they are (what tartiflette's coercion would return, without its task
        per variable); anything else (absent, null, defaults, lists, input objects, other
        types) goes through tartiflette's own coercion."""
        if not self.variable_definitions:
            return {}, []
        if self.simple_variables is not None and raw:
            values = _simple_coercion(self.simple_variables, raw)
            if values is not None:
                return values, []
        values, errors = await coerce_variables(self.variable_definitions, raw or {}, ctx)
        return values, errors or []

    async def execute(
        self, root: Any, ctx: Any, variables: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[Any]]:
        """Run the plan: (data, located errors)."""
        data: dict[str, Any] = {}
        run = _Run(ctx, variables, data)
        if self.serial:
            for plan in self.fields:
                _resolve_field(run, plan, root, data, None)
                await _settle(run)
        else:
            _fill(run, self.fields, root, data, None)
            await _settle(run)
        return (None if run.data_nulled else data), run.errors


async def compile_plan(schema: Any, document: Any, operation_name: str | None) -> Plan | None:
    """A plan for the operation, or None when it must run on tartiflette's executor
    (subscriptions, introspection, abstract types, dynamic directives, unknown operation)."""
    operations: dict[str | None, OperationDefinitionNode] = {}
    fragments: dict[str, FragmentDefinitionNode] = {}
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            operations[definition.name.value if definition.name else None] = definition
        elif isinstance(definition, FragmentDefinitionNode):
            fragments[definition.name.value] = definition
    if operation_name:
        operation = operations.get(operation_name)
    elif len(operations) == 1:
        operation = next(iter(operations.values()))
    else:
        operation = None
    if operation is None or operation.operation_type not in ("query", "mutation"):
        return None
    root_name = (
        schema.query_operation_name
        if operation.operation_type == "query"
        else schema.mutation_operation_name
    )
    root_type = schema.find_type(root_name)
    compiler = _Compiler(schema, operation, fragments)
    try:
        fields = await compiler.object_fields(root_type, [operation.selection_set])
    except Unsupported:
        return None
    return Plan(
        operation,
        fields,
        operation.operation_type == "mutation",
        collect_executable_variable_definitions(schema, operation),
        _simple_variables(operation),
    )


_SIMPLE_SCALARS = frozenset({"ID", "String", "Int", "Float", "Boolean"})


def _simple_variables(operation: OperationDefinitionNode) -> tuple[tuple[str, str], ...] | None:
    """(name, type) of each variable if all are built-in scalars, else None."""
    simple = []
    for definition in operation.variable_definitions or []:
        type_node = definition.type
        if isinstance(type_node, NonNullTypeNode):
            type_node = type_node.type
        if not isinstance(type_node, NamedTypeNode) or type_node.name.value not in _SIMPLE_SCALARS:
            return None
        simple.append((definition.variable.name.value, type_node.name.value))
    return tuple(simple)


def _simple_coercion(
    variables: tuple[tuple[str, str], ...], raw: dict[str, Any]
) -> dict[str, Any] | None:
    """`raw`'s values when each is exactly of its built-in type; None to coerce the long way."""
    values: dict[str, Any] = {}
    for name, type_name in variables:
        value: Any = raw.get(name)
        kind = type(value)
        if type_name == "String" or type_name == "ID":
            if kind is not str:
                if type_name == "ID" and kind is int:
                    value = str(value)
                else:
                    return None
        elif type_name == "Int":
            if kind is not int or not -_MAX_INT - 1 <= value <= _MAX_INT:
                return None
        elif type_name == "Boolean":
            if kind is not bool:
                return None
        elif kind is float or kind is int:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                return None
        else:
            return None
        values[name] = value
    return values


class _Compiler:
    def __init__(
        self,
        schema: Any,
        operation: OperationDefinitionNode,
        fragments: dict[str, FragmentDefinitionNode],
    ) -> None:
        self.schema = schema
        self.operation = operation
        self.fragments = fragments

    def collect(
        self, object_type: GraphQLObjectType, selection_sets: Iterable[Any]
    ) -> dict[str, list[FieldNode]]:
        """Fields by response key, fragments flattened (spec: CollectFields)."""
        grouped: dict[str, list[FieldNode]] = {}
        for selection_set in selection_sets:
            if selection_set is None:
                continue
            self._collect_into(object_type, selection_set, grouped, set())
        return grouped

    def _collect_into(
        self,
        object_type: GraphQLObjectType,
        selection_set: Any,
        grouped: dict[str, list[FieldNode]],
        visited: set[str],
    ) -> None:
        for selection in selection_set.selections:
            if not self._included(selection):
                continue
            if isinstance(selection, FieldNode):
                key = selection.alias.value if selection.alias else selection.name.value
                grouped.setdefault(key, []).append(selection)
            elif isinstance(selection, InlineFragmentNode):
                if self._applies(selection.type_condition, object_type):
                    self._collect_into(object_type, selection.selection_set, grouped, visited)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = self.fragments.get(name)
                if name in visited or fragment is None:
                    continue
                visited.add(name)
                if self._applies(fragment.type_condition, object_type):
                    self._collect_into(object_type, fragment.selection_set, grouped, visited)

    def _applies(self, condition: Any, object_type: GraphQLObjectType) -> bool:
        if condition is None or condition.name.value == object_type.name:
            return True
        return condition.name.value in (object_type.interfaces_names or [])

    def _included(self, node: Any) -> bool:
        for directive in node.directives or []:
            name = directive.name.value
            if name not in ("skip", "include"):
                raise Unsupported(f"directive @{name}")
            arguments = directive.arguments or []
            if not arguments or isinstance(arguments[0].value, VariableNode):
                raise Unsupported("@skip/@include with a variable")
            condition = arguments[0].value.value
            if (name == "skip") == bool(condition):
                return False
        return True

    async def object_fields(
        self, object_type: GraphQLObjectType, selection_sets: Iterable[Any]
    ) -> tuple[_Field, ...]:
        plans = []
        for key, nodes in self.collect(object_type, selection_sets).items():
            name = nodes[0].name.value
            if name == "__typename":
                plans.append(
                    _Field(
                        key,
                        name,
                        _Type(False, _TYPENAME, type_name=object_type.name),
                        nodes,
                        None,
                        {},
                        (),
                        None,
                    )
                )
                continue
            if name.startswith("__"):
                raise Unsupported("introspection")
            definition = object_type.find_field(name)
            if definition.directives:
                raise Unsupported(f"field directives on {object_type.name}.{name}")
            field_type = await self.type_plan(
                definition.graphql_type, [n.selection_set for n in nodes]
            )
            args, variable_args = await self.arguments(definition, nodes[0])
            resolver = getattr(definition, "raw_resolver", None)
            source_key = getattr(resolver, "source_key", "")  # see `renamed`: a plain read
            resolver = None if source_key else getattr(resolver, "direct", resolver)
            info = _Info(
                name,
                nodes,
                definition.graphql_type,
                object_type,
                self.schema,
                self.operation,
                self.fragments,
            )
            plans.append(
                _Field(
                    key, name, field_type, nodes, resolver, args, variable_args, info, source_key
                )
            )
        return tuple(plans)

    async def type_plan(self, graphql_type: Any, selection_sets: list[Any]) -> _Type:
        nullable = True
        if isinstance(graphql_type, GraphQLNonNull):
            nullable, graphql_type = False, graphql_type.wrapped_type
        if isinstance(graphql_type, GraphQLList):
            item = await self.type_plan(graphql_type.wrapped_type, selection_sets)
            return _Type(nullable, _LIST, item=item)
        if isinstance(graphql_type, GraphQLScalarType):
            return _Type(nullable, _LEAF, serialize=_scalar_serializer(graphql_type))
        if isinstance(graphql_type, GraphQLEnumType):
            return _Type(nullable, _LEAF, serialize=_enum_serializer(graphql_type))
        if isinstance(graphql_type, GraphQLObjectType):
            fields = await self.object_fields(graphql_type, selection_sets)
            return _Type(nullable, _OBJECT, fields=fields, type_name=graphql_type.name)
        raise Unsupported(f"abstract type {graphql_type}")

    async def arguments(
        self, definition: Any, node: FieldNode
    ) -> tuple[dict[str, Any], tuple[tuple[str, str, Any], ...]]:
        """Literal arguments coerced now; `$variable` arguments looked up per request."""
        given = {argument.name.value: argument for argument in node.arguments or []}
        static: dict[str, Any] = {}
        variable: list[tuple[str, str, Any]] = []
        for name, argument in definition.arguments.items():
            argument_node = given.get(name)
            if argument_node is not None and isinstance(argument_node.value, VariableNode):
                default = UNDEFINED_VALUE
                if argument.default_value is not None:
                    default = await _coerce_literal(argument, node, None)
                variable.append((name, argument_node.value.name.value, default))
                continue
            if argument_node is not None and _has_variable(argument_node.value):
                raise Unsupported("variables inside list or object arguments")
            value = await _coerce_literal(argument, node, argument_node)
            if value is not UNDEFINED_VALUE:
                static[name] = value
        return static, tuple(variable)


async def _coerce_literal(argument: Any, node: FieldNode, argument_node: Any) -> Any:
    """An argument's literal (or default) value, coerced by tartiflette's own rules."""
    result = await argument.coercer(argument, node, argument_node, {}, None)
    if isinstance(result, Exception) or getattr(result, "errors", None):
        raise Unsupported(f"argument {argument.name} does not coerce")
    return getattr(result, "value", result)


def _has_variable(value: Any) -> bool:
    if isinstance(value, VariableNode):
        return True
    for attribute in ("values", "fields"):
        children = getattr(value, attribute, None)
        if isinstance(children, list) and any(
            _has_variable(getattr(child, "value", child)) for child in children
        ):
            return True
    return False


class CompiledExecutor:
    """Runs queries and mutations of one cooked tartiflette engine through cached plans.

    A document is parsed and validated by tartiflette once; its plan is cached by (document,
    operation name) in a bounded LRU. Operations without a plan (see `compile_plan`) run
    on tartiflette's executor, so every valid document gets the same answer either way.
    """

    def __init__(self, engine: Any, max_plans: int = DEFAULT_MAX_PLANS) -> None:
        self.engine = engine
        self.max_plans = max_plans
        self._plans: OrderedDict[tuple[str, str | None], Plan | None] = OrderedDict()
        self.compiled = 0  # documents compiled (for metrics and tests)
        self.fallbacks = 0  # executions handed to tartiflette's executor

    async def plan_for(self, query: str, operation_name: str | None) -> Plan | list[Any] | None:
        """The cached plan, None to fall back, or tartiflette's parse/validation errors."""
        key = (query, operation_name)
        plans = self._plans
        if key in plans:
            plans.move_to_end(key)
            return plans[key]
        engine = self.engine
        document, errors = engine._cached_parse_and_validate_query(query, engine._schema)
        if errors:
            return list(errors)
        plan = await compile_plan(engine._schema, document, operation_name)
        self.compiled += 1
        plans[key] = plan
        if len(plans) > self.max_plans:
            plans.popitem(last=False)
        return plan

    async def execute(
        self,
        query: str,
        operation_name: str | None = None,
        context: Any = None,
        variables: dict[str, Any] | None = None,
        initial_value: Any = None,
    ) -> dict[str, Any]:
        """Execute a query or mutation; the same response as `engine.execute` would give."""
        engine = self.engine
        plan = await self.plan_for(query, operation_name)
        if isinstance(plan, list):
            result: dict[str, Any] = await engine._build_response(errors=plan)
            return result
        if plan is None:
            self.fallbacks += 1
            fallback: dict[str, Any] = await engine.execute(
                query, operation_name, context, variables, initial_value
            )
            return fallback
        values, errors = await plan.coerce_variables(variables, context)
        if errors:
            refused: dict[str, Any] = await engine._build_response(errors=errors)
            return refused
        data, errors = await plan.execute(initial_value, context, values)
        if not errors:
            return {"data": data}
        located: dict[str, Any] = await engine._build_response(data=data, errors=errors)
        return located


# --- execution ---------------------------------------------------------------------------


def _fill(
    run: _Run,
    fields: tuple[_Field, ...],
    source: Any,
    out: dict[str, Any],
    frame: _Frame | None,
) -> None:
    """Complete every field of one object into `out` (awaitables are queued on `run`)."""
    for plan in fields:
        if plan.resolver is None:
            kind = plan.type.kind
            if kind == _TYPENAME:
                out[plan.key] = plan.type.type_name
                continue
            if type(source) is dict:
                value = source.get(plan.source)
            else:
                value = getattr(source, plan.source, None)
            serialize = plan.type.serialize
            if kind == _LEAF and value is not None and serialize is not None:
                try:
                    out[plan.key] = serialize(value)
                except Exception as error:  # a value the type cannot represent
                    _fail(run, error, plan, out, frame)
                continue
            _complete(run, plan, plan.type, value, out, plan.key, frame)
        else:
            _resolve_field(run, plan, source, out, frame)


def _resolve_field(
    run: _Run, plan: _Field, source: Any, out: dict[str, Any], frame: _Frame | None
) -> None:
    args = plan.args
    if plan.variable_args:
        args = dict(args)
        variables = run.variables
        for name, variable, default in plan.variable_args:
            value = variables.get(variable, default)
            if value is not UNDEFINED_VALUE:
                args[name] = value
    try:
        value = plan.resolver(source, args, run.ctx, plan.info)  # type: ignore[misc]
    except Exception as error:
        _fail(run, error, plan, out, frame)
        return
    if inspect.isawaitable(value):
        out[plan.key] = None  # keeps the response's field order
        run.pending.append((value, plan, out, frame))
        return
    _complete(run, plan, plan.type, value, out, plan.key, frame)


async def _settle(run: _Run) -> None:
    """Await queued resolvers level by level; a level's awaitables run together."""
    while run.pending:
        batch, run.pending = run.pending, []
        if len(batch) == 1:
            awaitable, plan, out, frame = batch[0]
            try:
                results: list[Any] = [await awaitable]
            except Exception as error:
                results = [error]
        else:
            results = await asyncio.gather(*(item[0] for item in batch), return_exceptions=True)
        for (_awaitable, plan, out, frame), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                _fail(run, result, plan, out, frame)
            elif isinstance(result, BaseException):
                raise result  # cancellation and the like are not field errors
            else:
                _complete(run, plan, plan.type, result, out, plan.key, frame)


def _complete(
    run: _Run,
    plan: _Field,
    position: _Type,
    value: Any,
    container: Any,
    key: str | int,
    parent: _Frame | None,
) -> None:
    if value is None:
        container[key] = None
        if not position.nullable:
            _null_out(
                run,
                _Frame(parent, container, key, False),
                TypeError(f"Cannot return null for non-nullable field < {plan.name} >."),
                plan,
            )
        return
    kind = position.kind
    if kind == _LEAF:
        try:
            container[key] = position.serialize(value)  # type: ignore[misc]
        except Exception as error:
            container[key] = None
            _null_out(run, _Frame(parent, container, key, position.nullable), error, plan)
        return
    if kind == _OBJECT:
        out: dict[str, Any] = {}
        container[key] = out
        _fill(run, position.fields, value, out, _Frame(parent, container, key, position.nullable))
        return
    if kind == _TYPENAME:
        container[key] = position.type_name
        return
    try:
        items = list(value)
    except TypeError as error:
        container[key] = None
        _null_out(run, _Frame(parent, container, key, position.nullable), error, plan)
        return
    completed: list[Any] = [None] * len(items)
    container[key] = completed
    frame = _Frame(parent, container, key, position.nullable)
    item_type = position.item
    assert item_type is not None
    if item_type.kind == _OBJECT:
        fields = item_type.fields
        for index, item in enumerate(items):
            if item is None:
                _complete(run, plan, item_type, None, completed, index, frame)
                continue
            out = {}
            completed[index] = out
            _fill(run, fields, item, out, _Frame(frame, completed, index, item_type.nullable))
    else:
        for index, item in enumerate(items):
            _complete(run, plan, item_type, item, completed, index, frame)


def _fail(
    run: _Run, error: Exception, plan: _Field, out: dict[str, Any], frame: _Frame | None
) -> None:
    """A resolver or serialiser failed: locate the error, null the field (and propagate)."""
    out[plan.key] = None
    _null_out(run, _Frame(frame, out, plan.key, plan.type.nullable), error, plan)


def _null_out(run: _Run, position: _Frame, error: Exception, plan: _Field) -> None:
    """Record `error` at `position`; null the nearest nullable position at or above it."""
    path: Any = position.path()
    run.errors.extend(located_error(error, plan.nodes, path).exceptions)
    frame: _Frame | None = position
    while frame is not None and not frame.nullable:
        frame = frame.parent
    if frame is None:
        run.data_nulled = True
    else:
        frame.container[frame.key] = None
