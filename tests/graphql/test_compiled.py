"""Compiled plans answer exactly as tartiflette's own executor does.

Invariant: for every valid document, `CompiledExecutor.execute` returns the same `data` and
errors at the same paths as `engine.execute`; documents plans do not model fall back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tartiflette import Resolver, create_engine

from server.graphql.compiled import CompiledExecutor, direct, renamed

SCHEMA = "compiled-plan-test"
SDL = """
enum Status { ACTIVE ARCHIVED }
type Image { url: String! width: Int! }
type Product {
  id: ID!
  name: String!
  priceCents: Int!
  status: Status
  stock: Int!
  images(first: Int = 2): [Image!]!
  broken: Int
  brokenNonNull: Int!
  title: String!
}
type ProductEdge { node: Product! cursor: String! }
type ProductConnection { edges: [ProductEdge!]! total: Int! }
type Query {
  product(id: ID!): Product
  products(first: Int = 3, status: Status): ProductConnection!
  failing: String
  failingNonNull: String!
  greeting(name: String = "world", tags: [String!]): String!
  echo(i: Int, f: Float, b: Boolean, s: String): String
  later(n: Int!): Int
}
type Mutation { bump(by: Int!): Int! }
"""

PRODUCTS = {
    str(n): {
        "id": n,
        "name": f"Lamp {n}",
        "priceCents": 1000 + n,
        "status": "ACTIVE" if n % 2 else "ARCHIVED",
        "images": [{"url": f"/i/{n}/{k}.jpg", "width": 150 * (k + 1)} for k in range(3)],
        "broken": "not a number" if n == 2 else n,
        "brokenNonNull": None if n == 3 else n,
    }
    for n in range(1, 6)
}
LOADS: list[list[str]] = []


@Resolver("Query.product", schema_name=SCHEMA)
async def resolve_product(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return PRODUCTS.get(args["id"])


@Resolver("Query.products", schema_name=SCHEMA)
async def resolve_products(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    rows = [p for p in PRODUCTS.values() if args.get("status") in (None, p["status"])]
    rows = rows[: args["first"]]
    return {"edges": [{"node": p, "cursor": f"c{p['id']}"} for p in rows], "total": len(rows)}


@Resolver("Product.stock", schema_name=SCHEMA)
async def resolve_stock(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    # A batching loader in miniature: loads of one level arrive together.
    ctx["wanted"].append(str(parent["id"]))
    await asyncio.sleep(0)
    if not ctx["batches"] or ctx["batches"][-1] is not ctx["wanted"]:
        ctx["batches"].append(ctx["wanted"])
    return parent["id"] * 10


@Resolver("Product.images", schema_name=SCHEMA)
async def resolve_images(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return parent["images"][: args["first"]]


@Resolver("Query.failing", schema_name=SCHEMA)
async def resolve_failing(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    raise ValueError("this field always fails")


@Resolver("Query.failingNonNull", schema_name=SCHEMA)
async def resolve_failing_non_null(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    raise ValueError("and this one is non-null")


@Resolver("Query.greeting", schema_name=SCHEMA)
async def resolve_greeting(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return f"hello {args['name']} {','.join(args.get('tags') or [])}"


@Resolver("Mutation.bump", schema_name=SCHEMA)
async def resolve_bump(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    await asyncio.sleep(0.001 * (5 - args["by"]))  # later fields would finish first if run together
    ctx["bumps"].append(args["by"])
    return len(ctx["bumps"])


@Resolver("Query.later", schema_name=SCHEMA)
@direct
def resolve_later(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    # A value in the future, as a DataLoader's `load` gives (no coroutine of its own).
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.set_result, args["n"] * 2)
    return future


Resolver("Product.title", schema_name=SCHEMA)(renamed("name"))


DOCUMENTS: list[tuple[str, dict[str, Any] | None, str | None]] = [
    ('{ product(id: "1") { id name priceCents status } }', None, None),
    ("query P($id: ID!) { product(id: $id) { id name } }", {"id": "4"}, None),
    ("query P($id: ID!) { product(id: $id) { id } }", {"id": "404"}, None),
    ('{ a: product(id: "1") { name } b: product(id: "2") { n: name id } }', None, None),
    ('{ product(id: "1") { id } product(id: "1") { name } }', None, None),
    (
        "{ products { total edges { cursor node { id stock images { url width } } } } }",
        None,
        None,
    ),
    ("query($n: Int) { products(first: $n) { edges { node { id } } } }", {"n": 5}, None),
    ("query($n: Int) { products(first: $n) { edges { node { id } } } }", {}, None),
    ("{ products(first: 5, status: ARCHIVED) { edges { node { id status } } } }", None, None),
    ('{ product(id: "1") { images(first: 3) { url } } }', None, None),
    ('{ product(id: "2") { id broken } }', None, None),
    ('{ product(id: "3") { id brokenNonNull } }', None, None),
    ("{ products(first: 5) { edges { node { id brokenNonNull } } } }", None, None),
    ("{ failing greeting }", None, None),
    ("{ failingNonNull greeting }", None, None),
    ('{ greeting(name: "you", tags: ["a", "b"]) }', None, None),
    ("query($t: [String!]) { greeting(tags: $t) }", {"t": ["x"]}, None),
    (
        'query { product(id: "1") { ...F ... on Product { status } } } '
        "fragment F on Product { id name }",
        None,
        None,
    ),
    ('{ product(id: "1") { id name @skip(if: true) status @include(if: false) } }', None, None),
    ('{ product(id: "1") { __typename id } }', None, None),
    ('query A { product(id: "1") { id } } query B { greeting }', None, "B"),
    ("mutation { a: bump(by: 1) b: bump(by: 2) c: bump(by: 3) }", None, None),
    ("{ a: later(n: 2) b: later(n: 3) }", None, None),
    ("{ products(first: 2) { edges { node { id title } } } }", None, None),
]


async def _engine() -> Any:
    return await create_engine(SDL, schema_name=SCHEMA)


def _run(coroutine: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coroutine)


def _normalise(result: dict[str, Any]) -> tuple[Any, list[Any]]:
    errors = sorted(
        (tuple(e.get("path") or ()), e.get("locations")) for e in result.get("errors", [])
    )
    return result.get("data"), errors


def _ctx() -> dict[str, Any]:
    return {"wanted": [], "batches": [], "bumps": []}


@pytest.fixture(scope="module")
def engines() -> tuple[Any, CompiledExecutor]:
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(_engine())
    loop.close()
    return engine, CompiledExecutor(engine)


@pytest.mark.parametrize(("query", "variables", "operation"), DOCUMENTS)
def test_compiled_plan_answers_as_tartiflette_does(
    engines: tuple[Any, CompiledExecutor],
    query: str,
    variables: dict[str, Any] | None,
    operation: str | None,
) -> None:
    engine, compiled = engines

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        expected = await engine.execute(query, operation, _ctx(), variables)
        got = await compiled.execute(query, operation, _ctx(), variables)
        return expected, got

    expected, got = _run(both())
    assert _normalise(got) == _normalise(expected)
    assert got == expected or "errors" in got  # messages of errors may be worded differently


def test_documents_under_test_are_compiled_not_handed_back(
    engines: tuple[Any, CompiledExecutor],
) -> None:
    _engine, compiled = engines
    plans = [_run(compiled.plan_for(q, op)) for q, _v, op in DOCUMENTS]
    assert all(plan is not None and not isinstance(plan, list) for plan in plans)


def test_mutation_root_fields_run_one_after_another(
    engines: tuple[Any, CompiledExecutor],
) -> None:
    _engine, compiled = engines
    ctx = _ctx()
    result = _run(compiled.execute("mutation { a: bump(by: 1) b: bump(by: 2) }", None, ctx))
    assert ctx["bumps"] == [1, 2]
    assert result == {"data": {"a": 1, "b": 2}}


def test_resolvers_of_one_level_run_together_so_loaders_can_batch(
    engines: tuple[Any, CompiledExecutor],
) -> None:
    _engine, compiled = engines
    ctx = _ctx()
    _run(compiled.execute("{ products(first: 5) { edges { node { stock } } } }", None, ctx))
    assert ctx["batches"] == [["1", "2", "3", "4", "5"]]


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        ("{ __schema { queryType { name } } }", None),
        ("query($s: Boolean!) { greeting @skip(if: $s) }", {"s": True}),
    ],
)
def test_documents_plans_do_not_model_fall_back_to_tartiflette(
    engines: tuple[Any, CompiledExecutor], query: str, variables: dict[str, Any] | None
) -> None:
    engine, compiled = engines
    before = compiled.fallbacks

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            await engine.execute(query, None, _ctx(), variables),
            await compiled.execute(query, None, _ctx(), variables),
        )

    expected, got = _run(both())
    assert _normalise(got) == _normalise(expected)
    assert compiled.fallbacks == before + 1


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        ("{ product { id } }", None),
        ("{ nope }", None),
        ("query($id: ID!) { product(id: $id) { id } }", {}),
        ("query($n: Int) { products(first: $n) { total } }", {"n": "many"}),
    ],
)
def test_invalid_documents_and_variables_get_tartiflettes_errors(
    engines: tuple[Any, CompiledExecutor], query: str, variables: dict[str, Any] | None
) -> None:
    engine, compiled = engines

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            await engine.execute(query, None, _ctx(), variables),
            await compiled.execute(query, None, _ctx(), variables),
        )

    expected, got = _run(both())
    assert got["errors"] and got.get("data") is None
    assert [e["message"] for e in got["errors"]] == [e["message"] for e in expected["errors"]]


@pytest.mark.parametrize(
    "variables",
    [
        {"id": "1"},
        {"id": 1},
        {"id": 1.0},
        {"id": True},
        {"id": None},
        {},
        {"id": ["1"]},
    ],
)
def test_variables_take_the_short_way_only_when_tartiflette_would_agree(
    engines: tuple[Any, CompiledExecutor], variables: dict[str, Any]
) -> None:
    engine, compiled = engines
    query = "query P($id: ID!) { product(id: $id) { id name } }"

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return (
            await engine.execute(query, None, _ctx(), variables),
            await compiled.execute(query, None, _ctx(), variables),
        )

    expected, got = _run(both())
    assert got.get("data") == expected.get("data")
    assert [e["message"] for e in got.get("errors", [])] == [
        e["message"] for e in expected.get("errors", [])
    ]


@pytest.mark.parametrize(
    ("declaration", "value"),
    [
        ("Int", 5),
        ("Int", 2**40),
        ("Int", True),
        ("Int", "5"),
        ("Float", 2),
        ("Float", 2.5),
        ("Boolean", True),
        ("Boolean", 1),
        ("String", "x"),
        ("String", 5),
    ],
)
def test_scalar_variables_coerce_as_tartiflette_does(
    engines: tuple[Any, CompiledExecutor], declaration: str, value: Any
) -> None:
    _engine, compiled = engines
    argument = declaration[0].lower()
    query = f"query V($v: {declaration}) {{ echo({argument}: $v) }}"
    plan = _run(compiled.plan_for(query, None))
    assert plan is not None and not isinstance(plan, list)
    fast = _run(plan.coerce_variables({"v": value}, None))

    async def slow() -> Any:
        from tartiflette.coercers.variables import coerce_variables

        return await coerce_variables(plan.variable_definitions, {"v": value}, None)

    values, errors = _run(slow())
    if errors:
        assert fast[1], "the short way must not accept what tartiflette refuses"
    else:
        assert fast == (values, [])


def test_direct_resolvers_are_called_without_a_coroutine(
    engines: tuple[Any, CompiledExecutor],
) -> None:
    _engine, compiled = engines
    plan = _run(compiled.plan_for("{ later(n: 1) }", None))
    assert plan is not None and not isinstance(plan, list)
    assert plan.fields[0].resolver is resolve_later.direct  # type: ignore[attr-defined]


def test_renamed_fields_are_plain_reads_in_plans(engines: tuple[Any, CompiledExecutor]) -> None:
    _engine, compiled = engines
    plan = _run(compiled.plan_for('{ product(id: "1") { title } }', None))
    assert plan is not None and not isinstance(plan, list)
    title = plan.fields[0].type.fields[0]
    assert (title.resolver, title.source) == (None, "name")
