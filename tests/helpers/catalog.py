"""Catalog rows written straight to the catalog database, for tests that need products."""

from __future__ import annotations

import psycopg2


def add_product(catalog_dsn: str, stock: int = 10) -> int:
    """A product with `stock` units; returns its id."""
    with psycopg2.connect(catalog_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "WITH p AS (INSERT INTO products (name, price_cents) VALUES ('Test Lamp', 1999) "
            "RETURNING id) INSERT INTO inventory (product_id, stock) SELECT id, %s FROM p "
            "RETURNING product_id",
            (stock,),
        )
        (product_id,) = cur.fetchone()
    conn.close()
    return int(product_id)


def insert_products(dsn: str, rows: list[tuple[str, str, int]]) -> list[int]:
    """Products (name, description, stock) written straight to the catalog; their ids."""
    ids = []
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for name, description, stock in rows:
            cur.execute(
                "WITH p AS (INSERT INTO products (name, description, price_cents) "
                "VALUES (%s, %s, 1999) RETURNING id) "
                "INSERT INTO inventory (product_id, stock) SELECT id, %s FROM p "
                "RETURNING product_id",
                (name, description, stock),
            )
            ids.append(int(cur.fetchone()[0]))
    conn.close()
    return ids
