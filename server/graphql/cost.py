"""Static cost and depth of an operation, computed before any resolver runs, and its actual
cost computed from the result afterwards (Shopify's rules).

Rules (requested cost, with the variables applied):
- scalars and enums cost 0, objects 1; a list of objects that is not a connection costs as one
  object (its length is not known in advance);
- a connection (a field whose type is `...Connection`) costs 1, plus `first` (or `last`; 20 when
  neither is given) times the cost of one item (`edges { node ... }` or `nodes`), plus its other
  fields (`pageInfo`) once. Edge objects are plumbing and cost nothing themselves: an item costs
  what its `node` costs;
- each root field of a mutation costs 10 plus the cost of what it selects.

The actual cost walks the result with the same plan: connections count the items they
returned, nulls cost nothing, lists count their most expensive item. It is never above the
requested cost, which is charged up front; the difference is refunded.

Depth is the number of nested fields (`products { edges { node { id } } }` is 4). Fragments
are costed once each (memoised), so a document that spreads fragments exponentially costs
linear time to analyse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tartiflette.language.ast import (
    FieldNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    IntValueNode,
    VariableNode,
)

from server.graphql.errors import MAX_COST_EXCEEDED, MAX_DEPTH_EXCEEDED, GraphQLRequestError

DEFAULT_PAGE = 20  # the page size of connections when neither first nor last is given
MUTATION_COST = 10
_ITEM_FIELDS = frozenset({"edges", "nodes"})
# Depth past which the walk stops counting (the depth limit is far lower; this bounds the
# recursion for any document, fragments included).
_HARD_DEPTH_CAP = 200


@dataclass(frozen=True, slots=True)
class FieldShape:
    """What the cost rules need to know about one field of the schema."""

    type_name: str  # the named type, without list and non-null wrappers
    leaf: bool  # scalar or enum
    is_list: bool
    connection: bool


Shapes = Mapping[str, Mapping[str, FieldShape]]  # type name -> field name -> shape


class _Entry:
    """One selected object field: its own cost and what it selects (leaves are left out)."""

    __slots__ = ("children", "is_list", "items", "key", "multiplier", "name", "own", "static")

    def __init__(
        self,
        key: str,
        name: str,
        own: int,
        children: tuple[_Entry, ...],
        *,
        is_list: bool = False,
        items: tuple[_Entry, ...] = (),
        multiplier: int = 0,
    ) -> None:
        self.key = key
        self.name = name
        self.own = own
        self.children = children
        self.is_list = is_list
        self.items = items
        self.multiplier = multiplier
        self.static: int = (
            own
            + sum(child.static for child in children)
            + multiplier * sum(item.static for item in items)
        )

    def actual(self, value: Any) -> int:
        """The cost of this field given what it returned."""
        if value is None:
            return 0
        if self.is_list and isinstance(value, list):
            return max((self.actual_one(item) for item in value), default=0)
        return self.actual_one(value)

    def actual_one(self, value: Any) -> int:
        if not isinstance(value, dict):
            return self.own if value is not None else 0
        total = self.own
        for child in self.children:
            total += child.actual(value.get(child.key))
        for item in self.items:  # connection items: every returned one counts
            items = value.get(item.key)
            if isinstance(items, list):
                total += sum(item.actual_one(one) for one in items)
        return total


@dataclass(frozen=True, slots=True)
class CostReport:
    """The analysis of one operation."""

    requested: int
    depth: int
    private: bool  # reads the caller's own data, or is not a query: never cached or shared
    live: bool  # selects live stock: cached results expire within the stock freshness bound
    plan: tuple[_Entry, ...]

    def actual(self, data: Any) -> int:
        """The actual cost of the operation given its result's `data`."""
        if not isinstance(data, dict):
            return 0
        return sum(entry.actual(data.get(entry.key)) for entry in self.plan)


class _Walk:
    def __init__(
        self, shapes: Shapes, fragments: Mapping[str, Any], variables: Mapping[str, Any]
    ) -> None:
        self.shapes = shapes
        self.fragments = fragments
        self.variables = variables
        self.memo: dict[tuple[str, str], tuple[tuple[_Entry, ...], int, bool]] = {}
        self.in_progress: set[str] = set()

    def selection(
        self, selections: Iterable[Any], type_name: str, depth: int, mutation_root: bool = False
    ) -> tuple[list[_Entry], int, bool]:
        """(entries, deepest field depth, whether live stock is selected) of a selection set
        at `depth` (relative to the operation or to the enclosing fragment). Fields of a
        `mutation_root` cost `MUTATION_COST` each instead of 1."""
        entries: list[_Entry] = []
        deepest, live = depth, False
        if depth >= _HARD_DEPTH_CAP:
            return entries, depth + 1, live
        fields = self.shapes.get(type_name, {})
        for node in selections:
            if isinstance(node, FieldNode):
                name = node.name.value
                shape = fields.get(name)
                if shape is None:
                    continue  # __typename (validation refused anything else unknown)
                here = depth + 1
                key = node.alias.value if node.alias else name
                if shape.leaf:
                    deepest = max(deepest, here)
                    live = live or (name == "stock" and type_name == "Product")
                    if mutation_root:
                        entries.append(_Entry(key, name, MUTATION_COST, ()))
                    continue
                sub = node.selection_set.selections if node.selection_set else ()
                children, sub_depth, sub_live = self.selection(sub, shape.type_name, here)
                deepest, live = max(deepest, sub_depth), live or sub_live
                if shape.connection:
                    items = tuple(c for c in children if c.name in _ITEM_FIELDS)
                    fixed = tuple(c for c in children if c.name not in _ITEM_FIELDS)
                    n = self.page_size(node)
                    entries.append(_Entry(key, name, 1, fixed, items=items, multiplier=n))
                else:
                    own = 0 if shape.type_name.endswith("Edge") else 1
                    own = MUTATION_COST if mutation_root else own
                    entries.append(_Entry(key, name, own, tuple(children), is_list=shape.is_list))
            elif isinstance(node, InlineFragmentNode):
                inner = node.type_condition.name.value if node.type_condition else type_name
                sub_entries, sub_depth, sub_live = self.selection(
                    node.selection_set.selections, inner, depth, mutation_root
                )
                entries.extend(sub_entries)
                deepest, live = max(deepest, sub_depth), live or sub_live
            elif isinstance(node, FragmentSpreadNode):
                sub_entries_t, rel_depth, sub_live = self.fragment(node.name.value)
                entries.extend(sub_entries_t)
                deepest, live = max(deepest, depth + rel_depth), live or sub_live
        return entries, deepest, live

    def fragment(self, name: str) -> tuple[tuple[_Entry, ...], int, bool]:
        fragment = self.fragments.get(name)
        if fragment is None or name in self.in_progress:
            return (), 0, False  # unknown or cyclic (validation refuses both)
        type_name = fragment.type_condition.name.value
        memo_key = (name, type_name)
        found = self.memo.get(memo_key)
        if found is None:
            self.in_progress.add(name)
            try:
                entries, depth, live = self.selection(
                    fragment.selection_set.selections, type_name, 0
                )
            finally:
                self.in_progress.discard(name)
            found = self.memo[memo_key] = (tuple(entries), depth, live)
        return found

    def page_size(self, node: Any) -> int:
        sizes = []
        for argument in node.arguments or ():
            if argument.name.value not in ("first", "last"):
                continue
            value = argument.value
            if isinstance(value, IntValueNode):
                sizes.append(int(value.value))
            elif isinstance(value, VariableNode):
                given = self.variables.get(value.name.value)
                if isinstance(given, int) and not isinstance(given, bool):
                    sizes.append(given)
        return max(0, max(sizes)) if sizes else DEFAULT_PAGE


def analyse(
    operation: Any,
    fragments: Mapping[str, Any],
    variables: Mapping[str, Any],
    shapes: Shapes,
    *,
    root_type: str,
    private_roots: frozenset[str],
) -> CostReport:
    """Cost, depth and cacheability of `operation` (tartiflette AST) with `variables`."""
    walk = _Walk(shapes, fragments, variables)
    is_query = operation.operation_type == "query"
    entries, depth, live = walk.selection(
        operation.selection_set.selections,
        root_type,
        0,
        mutation_root=operation.operation_type == "mutation",
    )
    private = not is_query or bool(_root_field_names(operation, fragments) & private_roots)
    plan = tuple(entries)
    return CostReport(sum(e.static for e in plan), depth, private, live, plan)


def _root_field_names(operation: Any, fragments: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    pending = list(operation.selection_set.selections)
    seen: set[str] = set()
    while pending:
        node = pending.pop()
        if isinstance(node, FieldNode):
            names.add(node.name.value)
        elif isinstance(node, InlineFragmentNode):
            pending.extend(node.selection_set.selections)
        elif isinstance(node, FragmentSpreadNode) and node.name.value not in seen:
            seen.add(node.name.value)
            fragment = fragments.get(node.name.value)
            if fragment is not None:
                pending.extend(fragment.selection_set.selections)
    names.discard("__typename")
    return names


def check_limits(report: CostReport, *, max_cost: int, max_depth: int) -> None:
    """Refuse an operation over the depth or cost limit (`GraphQLRequestError`)."""
    if report.depth > max_depth:
        shown = f"at least {report.depth}" if report.depth > _HARD_DEPTH_CAP else report.depth
        raise GraphQLRequestError(
            MAX_DEPTH_EXCEEDED,
            f"query depth is {shown}, which exceeds the maximum of {max_depth}",
            depth=report.depth,
            maxDepth=max_depth,
        )
    if report.requested > max_cost:
        raise GraphQLRequestError(
            MAX_COST_EXCEEDED,
            f"query cost is {report.requested}, which exceeds the single query max cost "
            f"limit ({max_cost})",
            cost=report.requested,
            maxCost=max_cost,
        )
