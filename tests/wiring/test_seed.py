"""Demo seeding: believable products with stock, added in batches, numbering continued."""

from __future__ import annotations

import psycopg2
import pytest

from server.adapters.db.pools import Database
from server.wiring.demo_catalog import demo_products
from server.wiring.seed import seed_catalog
from server.wiring.settings import Settings


def test_demo_products_are_deterministic_and_plausible() -> None:
    first = list(demo_products(200))
    assert first == list(demo_products(200))
    assert len({p.sku for p in first}) == 200
    assert all(499 <= p.price_cents < 100_000 and p.price_cents % 100 == 99 for p in first)
    assert all(p.stock >= 0 and len(p.name.split()) >= 3 for p in first)
    assert any(p.stock == 0 for p in first), "some products are sold out, as in a real shop"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_seed_adds_products_with_inventory_and_continues_numbering(
    settings: Settings, infra_env: dict[str, str]
) -> None:
    db = await Database.open(settings)
    try:
        assert await seed_catalog(db, 1200, show_progress=False) == 1200
        assert await seed_catalog(db, 5, show_progress=False) == 5
    finally:
        await db.close()
    with psycopg2.connect(infra_env["FM_CATALOG_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT sku), max(sku) FROM products")
        assert cur.fetchone() == (1205, 1205, "FM-001205")
        cur.execute("SELECT count(*) FROM products p JOIN inventory i ON i.product_id = p.id")
        assert cur.fetchone() == (1205,)
    conn.close()
