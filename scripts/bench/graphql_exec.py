"""GraphQL execution engines side by side: the same schema, documents, resolvers and data.

Used by `scripts/bench/graphql` (section "execution"). Measures microseconds per query for
two documents, a 4-field product and `products(first: 50)` with 3 images each:

* graphql-core 3.2 (the engine under Strawberry, Ariadne and Graphene) with the document
  parsed and validated once, as those libraries' caches do, and with parsing and validating
  every time; each with synchronous and with async root resolvers (the faster is the peer);
* tartiflette 1.4.1's executor, with its defaults and with concurrent coercion switched off,
  driven by Final Market's `Executor` with compiled plans off (documents parsed once);
* Final Market's `Executor` as the node runs it (parse cache, prepare, compiled plan).

The schema is Final Market's own SDL (`server/graphql/*.graphql`); the two root fields get
in-memory resolvers in every engine and every other field reads its value from the data, so
only the engines differ. HTTP, cost analysis and caches are not part of this figure.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import graphql

from server.graphql.executor import RESOLVER_MODULES, Executor

SDL_FILES = [Path(module.SDL) for module in RESOLVER_MODULES]
SDL = "\n".join(path.read_text() for path in SDL_FILES)

PRODUCT_QUERY = "query Product($id: ID!) { product(id: $id) { id name priceCents currency } }"
LIST_QUERY = """query List {
  products(first: 50) {
    edges { cursor node { id name priceCents stock images { id src { small medium large } } } }
    pageInfo { hasNextPage endCursor }
  }
}"""
DOCUMENTS = {
    "product (4 fields)": (PRODUCT_QUERY, {"id": "7"}),
    "products(first: 50) + 3 images": (LIST_QUERY, None),
}


def _image(n: int, k: int) -> dict[str, Any]:
    src = {size: f"/images/{n}-{k}/{size}" for size in ("thumbnail", "small", "medium", "large")}
    return {"id": f"{n}{k}", "placeholder": "data:image/webp;base64,UklG", "src": src}


PRODUCTS = [
    {
        "id": str(n),
        "name": f"Product {n}",
        "description": "A thing one buys",
        "priceCents": 1000 + n,
        "currency": "EUR",
        "stock": n % 17,
        "updatedAt": "2026-11-27T00:00:00Z",
        "images": [_image(n, k) for k in range(3)],
    }
    for n in range(1, 201)
]
BY_ID = {p["id"]: p for p in PRODUCTS}


def _product(args: dict[str, Any]) -> Any:
    return BY_ID.get(str(args["id"]))


def _products(args: dict[str, Any]) -> Any:
    rows = PRODUCTS[: args.get("first") or 10]
    return {
        "edges": [{"node": p, "cursor": f"c{p['id']}"} for p in rows],
        "pageInfo": {"hasNextPage": True, "endCursor": f"c{rows[-1]['id']}"},
    }


async def _resolve_product(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return _product(args)


async def _resolve_products(parent: Any, args: dict[str, Any], ctx: Any, info: Any) -> Any:
    return _products(args)


# The product's SDL files with in-memory root resolvers (no other resolvers).
BENCH_MODULES = tuple(
    SimpleNamespace(
        SDL=path,
        RESOLVERS=(
            {"Query.product": _resolve_product, "Query.products": _resolve_products}
            if index == 0
            else {}
        ),
        SUBSCRIPTIONS={},
    )
    for index, path in enumerate(SDL_FILES)
)


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


def _executor_call(
    executor: Executor, query: str, variables: dict[str, Any] | None
) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        prepared = await executor.prepare(executor.parse(query), None, variables, None)
        return await executor.execute(prepared)

    return run


def measure(
    seconds: float = 2.0, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """One row per (document, engine): microseconds per query."""
    say = progress or (lambda _m: None)
    loop = asyncio.new_event_loop()
    modules: Any = BENCH_MODULES
    engines = {
        "tartiflette executor, defaults": Executor(modules=modules, compiled_plans=False),
        "tartiflette executor, concurrent coercion off": Executor(
            modules=modules,
            compiled_plans=False,
            coerce_list_concurrently=False,
            coerce_parent_concurrently=False,
        ),
        "Final Market (compiled plans)": Executor(modules=modules),
    }
    for executor in engines.values():
        loop.run_until_complete(executor.start())
    rows = []
    for label, (query, variables) in DOCUMENTS.items():
        answers = [
            loop.run_until_complete(_executor_call(executor, query, variables)())
            for executor in engines.values()
        ]
        assert "errors" not in answers[0], answers[0]
        assert all(answer == answers[0] for answer in answers), "engines must agree"
        contenders: dict[str, Callable[[], Awaitable[Any]]] = {}
        for async_roots in (False, True):
            kind = "async roots" if async_roots else "sync roots"
            for name, call in _graphql_core_calls(async_roots, query, variables).items():
                contenders[f"graphql-core {name}, {kind}"] = call
        for name, executor in engines.items():
            contenders[name] = _executor_call(executor, query, variables)
        peer = loop.run_until_complete(contenders["graphql-core pre-parsed, sync roots"]())
        assert peer.data == answers[0]["data"], "graphql-core must give the same data"
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
