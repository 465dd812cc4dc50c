"""Catalog rows in bulk: the statements demo seeding and imports use."""

from __future__ import annotations

from collections.abc import Sequence

import aiopg

from server.wiring.demo_catalog import DemoProduct

# One statement per batch: products and their inventory rows together, joined by SKU.
_INSERT_PRODUCTS = """
WITH new AS (
    INSERT INTO products (sku, name, description, price_cents, currency)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[])
    RETURNING id, sku
)
INSERT INTO inventory (product_id, stock)
SELECT new.id, s.stock FROM new JOIN unnest(%s::text[], %s::int[]) AS s(sku, stock) USING (sku)
"""


async def count_products(pool: aiopg.Pool) -> int:
    """How many products the catalog holds."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM products")
        row = await cur.fetchone()
        return int(row[0])


async def insert_products(pool: aiopg.Pool, products: Sequence[DemoProduct]) -> int:
    """Insert `products` with their stock in one statement; returns the number inserted."""
    if not products:
        return 0
    skus = [p.sku for p in products]
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            _INSERT_PRODUCTS,
            (
                skus,
                [p.name for p in products],
                [p.description for p in products],
                [p.price_cents for p in products],
                [p.currency for p in products],
                skus,
                [p.stock for p in products],
            ),
        )
        return int(cur.rowcount)
