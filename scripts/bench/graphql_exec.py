"""GraphQL execution engines side by side: the same schema, documents, resolvers and data.

Used by `scripts/bench/graphql` (section "execution"). Measures microseconds per query for
two documents, a 4-field product page and `products(first: 50)` with 3 images each:

* graphql-core 3.2 (the engine under Strawberry, Ariadne and Graphene) with the document
  parsed and validated once, as those libraries' caches do, and with parsing and validating
  every time; each with synchronous and with async root resolvers (the better is the peer);
* tartiflette 1.4.1 with its defaults, and with concurrent coercion switched off;
* Final Market's compiled plans (`server.graphql.compiled.CompiledExecutor`) over the
  same tartiflette engine.

The schema is the product part of Final Market's (CONTRACT "GraphQL"); data is in memory so
only the engines differ.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import graphql
from tartiflette import Resolver, create_engine

from server.graphql.compiled import CompiledExecutor

SDL = """
type Image { size: String! format: String! url: String! width: Int! height: Int! }
type Product {
  id: ID! name: String! description: String! priceCents: Int! currency: String!
  stock: Int! images: [Image!]! updatedAt: String!
}
type ProductEdge { node: Product! cursor: String! }
type PageInfo { hasNextPage: Boolean! endCursor: String }
type ProductConnection { edges: [ProductEdge!]! pageInfo: PageInfo! }
type Query {
  product(id: ID!): Product
  products(first: Int, after: String): ProductConnection!
}
"""

PRODUCT_QUERY = "query Product($id: ID!) { product(id: $id) { id name priceCents currency } }"
LIST_QUERY = """query List {
  products(first: 50) {
    edges { cursor node { id name priceCents stock images { size format url } } }
    pageInfo { hasNextPage endCursor }
  }
}"""
DOCUMENTS = {
    "product (4 fields)": (PRODUCT_QUERY, {"id": "7"}),
    "products(first: 50) + 3 images": (LIST_QUERY, None),
}

PRODUCTS = [
    {
        "id": n,
        "name": f"Product {n}",
        "description": "A thing one buys",
        "priceCents": 1000 + n,
        "currency": "EUR",
        "stock": n % 17,
        "updatedAt": "2026-11-27T00:00:00Z",
        "images": [
            {
                "size": size,
                "format": "avif",
                "url": f"/images/{n}/{size}.avif",
                "width": 300,
                "height": 200,
            }
            for size in ("small", "medium", "large")
        ],
    }
    for n in range(1, 201)
]
BY_ID = {str(p["id"]): p for p in PRODUCTS}


def _product(args: dict[str, Any]) -> Any:
    return BY_ID.get(str(args["id"]))


def _products(args: dict[str, Any]) -> Any:
    rows = PRODUCTS[: args.get("first") or 10]
    return {
        "edges": [{"node": p, "cursor": f"c{p['id']}"} for p in rows],
        "pageInfo": {"hasNextPage": True, "endCursor": f"c{rows[-1]['id']}"},
    }


SCHEMA_NAME = "bench-execution"
FAST_SCHEMA_NAME = "bench-execution-no-concurrent-coercion"


@Resolver("Query.product", schema_name=SCHEMA_NAME)
@Resolver("Query.product", schema_name=FAST_SCHEMA_NAME)
async def _resolve_product(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return _product(args)


@Resolver("Query.products", schema_name=SCHEMA_NAME)
@Resolver("Query.products", schema_name=FAST_SCHEMA_NAME)
async def _resolve_products(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return _products(args)


def _dict_resolver(parent: Any, info: Any, **args: Any) -> Any:
    # graphql-core's default resolver checks Mapping first too; this is its fast form.
    return parent.get(info.field_name) if isinstance(parent, dict) else None


def _graphql_core_schema(async_roots: bool) -> graphql.GraphQLSchema:
    schema = graphql.build_schema(SDL)
    query = schema.query_type
    assert query is not None
    if async_roots:

        async def product(_p: Any, _i: Any, **args: Any) -> Any:
            return _product(args)

        async def products(_p: Any, _i: Any, **args: Any) -> Any:
            return _products(args)

        query.fields["product"].resolve = product
        query.fields["products"].resolve = products
    else:
        query.fields["product"].resolve = lambda _p, _i, **args: _product(args)
        query.fields["products"].resolve = lambda _p, _i, **args: _products(args)
    return schema


def _time_per_call(
    loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[Any]], seconds: float
) -> float:
    """Median microseconds per call over five rounds of about `seconds`/5 each."""

    async def rounds() -> list[float]:
        for _ in range(20):  # warm caches (parsed documents, plans)
            await call()
        results = []
        for _ in range(5):
            count, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / 5:
                for _ in range(10):
                    await call()
                count += 10
            results.append(elapsed / count * 1e6)
        return results

    return statistics.median(loop.run_until_complete(rounds()))


def _graphql_core_calls(
    async_roots: bool, query: str, variables: dict[str, Any] | None
) -> dict[str, Callable[[], Awaitable[Any]]]:
    schema = _graphql_core_schema(async_roots)
    document = graphql.parse(query)
    assert not graphql.validate(schema, document)

    async def pre_parsed() -> Any:
        result = graphql.execute(
            schema, document, variable_values=variables, field_resolver=_dict_resolver
        )
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        assert not result.errors, result.errors
        return result

    async def parse_every_time() -> Any:
        parsed = graphql.parse(query)
        assert not graphql.validate(schema, parsed)
        result = graphql.execute(
            schema, parsed, variable_values=variables, field_resolver=_dict_resolver
        )
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        return result

    return {"pre-parsed": pre_parsed, "parse+validate each time": parse_every_time}


def measure(
    seconds: float = 2.0, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """One row per (document, engine): microseconds per query."""
    say = progress or (lambda _m: None)
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(create_engine(SDL, schema_name=SCHEMA_NAME))
    fast_coercion = loop.run_until_complete(
        create_engine(
            SDL,
            schema_name=FAST_SCHEMA_NAME,
            coerce_list_concurrently=False,
            coerce_parent_concurrently=False,
        )
    )
    compiled = CompiledExecutor(fast_coercion)
    rows = []
    for label, (query, variables) in DOCUMENTS.items():
        expected = loop.run_until_complete(engine.execute(query, None, {}, variables))
        assert "errors" not in expected, expected
        got = loop.run_until_complete(compiled.execute(query, None, {}, variables))
        assert got == expected, "compiled plans must answer as tartiflette does"
        contenders: dict[str, Callable[[], Awaitable[Any]]] = {}
        for async_roots in (False, True):
            kind = "async roots" if async_roots else "sync roots"
            for name, call in _graphql_core_calls(async_roots, query, variables).items():
                contenders[f"graphql-core {name}, {kind}"] = call
        contenders["tartiflette defaults"] = lambda q=query, v=variables: engine.execute(
            q, None, {}, v
        )
        contenders["tartiflette, concurrent coercion off"] = lambda q=query, v=variables: (
            fast_coercion.execute(q, None, {}, v)
        )
        contenders["Final Market (compiled plans)"] = lambda q=query, v=variables: compiled.execute(
            q, None, {}, v
        )
        for name, call in contenders.items():
            say(f"execution: {label}: {name}")
            rows.append(
                {"document": label, "engine": name, "us": _time_per_call(loop, call, seconds)}
            )
    loop.close()
    return rows


def report(rows: list[dict[str, Any]]) -> list[str]:
    """Table lines plus, per document, the ratio against graphql-core pre-parsed (best)."""
    lines = []
    for label in DOCUMENTS:
        mine = [r for r in rows if r["document"] == label]
        peer = min(r["us"] for r in mine if "graphql-core pre-parsed" in r["engine"])
        ours = next(r["us"] for r in mine if r["engine"].startswith("Final Market"))
        lines.append(f"{label}")
        for r in mine:
            lines.append(f"  {r['engine']:<48} {r['us']:>10.1f} us")
        lines.append(
            f"  ratio Final Market / graphql-core pre-parsed (best): {ours / peer:.2f} "
            f"({'goal met' if ours <= peer else 'goal NOT met'}: at most 1.00)"
        )
    return lines


if __name__ == "__main__":
    table = report(measure(progress=lambda m: print(m, file=sys.stderr)))
    print("\n".join(table))
